//! IPVS generic netlink messages: a command and its service and destination
//! attributes, as `linux/ip_vs.h` lays them out.
//!
//! The attribute structs mirror the wire: every attribute is optional, so they
//! can say anything the kernel can (a firewall-mark service, a scheduler kproxy
//! does not know). Turning them into kproxy's types, which can be refused, is
//! `convert`'s job.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::netlink::codec::{
    Be16, Codec, DecodeError, NulString, Reader, for_each_attr, put_attr, put_nested, set_once,
};
use crate::netlink::sys::*;

/// The IPVS commands the client sends or reads back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    NewService,
    SetService,
    DelService,
    GetService,
    NewDest,
    SetDest,
    DelDest,
    GetDest,
    /// Sets the connection timeouts; also the kernel's reply to `GetConfig`.
    SetConfig,
    GetConfig,
    Flush,
}

impl Command {
    pub fn code(self) -> u8 {
        match self {
            Command::NewService => IPVS_CMD_NEW_SERVICE,
            Command::SetService => IPVS_CMD_SET_SERVICE,
            Command::DelService => IPVS_CMD_DEL_SERVICE,
            Command::GetService => IPVS_CMD_GET_SERVICE,
            Command::NewDest => IPVS_CMD_NEW_DEST,
            Command::SetDest => IPVS_CMD_SET_DEST,
            Command::DelDest => IPVS_CMD_DEL_DEST,
            Command::GetDest => IPVS_CMD_GET_DEST,
            Command::SetConfig => IPVS_CMD_SET_CONFIG,
            Command::GetConfig => IPVS_CMD_GET_CONFIG,
            Command::Flush => IPVS_CMD_FLUSH,
        }
    }

    pub fn from_code(code: u8) -> Result<Self, DecodeError> {
        Ok(match code {
            IPVS_CMD_NEW_SERVICE => Command::NewService,
            IPVS_CMD_SET_SERVICE => Command::SetService,
            IPVS_CMD_DEL_SERVICE => Command::DelService,
            IPVS_CMD_GET_SERVICE => Command::GetService,
            IPVS_CMD_NEW_DEST => Command::NewDest,
            IPVS_CMD_SET_DEST => Command::SetDest,
            IPVS_CMD_DEL_DEST => Command::DelDest,
            IPVS_CMD_GET_DEST => Command::GetDest,
            IPVS_CMD_SET_CONFIG => Command::SetConfig,
            IPVS_CMD_GET_CONFIG => Command::GetConfig,
            IPVS_CMD_FLUSH => Command::Flush,
            other => return Err(DecodeError::UnknownCommand(other)),
        })
    }
}

/// `union nf_inet_addr`: 16 bytes, an IPv4 address in the first 4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct InetAddr(pub [u8; 16]);

impl InetAddr {
    /// The address as the given family reads it, if the family is one.
    pub fn ip(&self, af: u16) -> Option<IpAddr> {
        match af {
            AF_INET => {
                let [a, b, c, d, ..] = self.0;
                Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
            }
            AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(self.0))),
            _ => None,
        }
    }
}

impl From<IpAddr> for InetAddr {
    fn from(ip: IpAddr) -> Self {
        let mut out = [0; 16];
        match ip {
            IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => out = v6.octets(),
        }
        InetAddr(out)
    }
}

impl Codec for InetAddr {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(InetAddr(r.take_array("address")?))
    }
}

/// The family number of an address.
pub fn af_of(ip: &IpAddr) -> u16 {
    match ip {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

/// `struct ip_vs_flags`: the flags to set, and which of them to change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SvcFlags {
    pub flags: u32,
    pub mask: u32,
}

impl Codec for SvcFlags {
    fn encode(&self, out: &mut Vec<u8>) {
        self.flags.encode(out);
        self.mask.encode(out);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(SvcFlags {
            flags: u32::read(r)?,
            mask: u32::read(r)?,
        })
    }
}

/// The attributes nested under `IPVS_CMD_ATTR_SERVICE`.
///
/// `netmask` is the attribute's 4 bytes read in host order, as the kernel
/// stores them: for IPv6 that is the prefix length; for IPv4 it is the mask in
/// network byte order (`convert` deals with the difference).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceAttrs {
    pub af: Option<u16>,
    pub protocol: Option<u16>,
    pub addr: Option<InetAddr>,
    pub port: Option<u16>,
    pub fwmark: Option<u32>,
    pub sched_name: Option<String>,
    pub pe_name: Option<String>,
    pub flags: Option<SvcFlags>,
    pub timeout: Option<u32>,
    pub netmask: Option<u32>,
}

impl Codec for ServiceAttrs {
    /// In ipvsadm's order, which the reference bytes follow.
    fn encode(&self, out: &mut Vec<u8>) {
        if let Some(af) = self.af {
            put_attr(out, IPVS_SVC_ATTR_AF, &af);
        }
        if let Some(protocol) = self.protocol {
            put_attr(out, IPVS_SVC_ATTR_PROTOCOL, &protocol);
        }
        if let Some(addr) = &self.addr {
            put_attr(out, IPVS_SVC_ATTR_ADDR, addr);
        }
        if let Some(port) = self.port {
            put_attr(out, IPVS_SVC_ATTR_PORT, &Be16(port));
        }
        if let Some(fwmark) = self.fwmark {
            put_attr(out, IPVS_SVC_ATTR_FWMARK, &fwmark);
        }
        if let Some(name) = &self.sched_name {
            put_attr(out, IPVS_SVC_ATTR_SCHED_NAME, &NulString(name.clone()));
        }
        if let Some(name) = &self.pe_name {
            put_attr(out, IPVS_SVC_ATTR_PE_NAME, &NulString(name.clone()));
        }
        if let Some(flags) = &self.flags {
            put_attr(out, IPVS_SVC_ATTR_FLAGS, flags);
        }
        if let Some(timeout) = self.timeout {
            put_attr(out, IPVS_SVC_ATTR_TIMEOUT, &timeout);
        }
        if let Some(netmask) = self.netmask {
            put_attr(out, IPVS_SVC_ATTR_NETMASK, &netmask);
        }
    }

    /// Reads a whole attribute list; attributes kproxy does not use (the
    /// statistics) are skipped.
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut s = ServiceAttrs::default();
        for_each_attr(r.rest(), |a| match a.kind {
            IPVS_SVC_ATTR_AF => set_once(&mut s.af, a.get("IPVS_SVC_ATTR_AF")?, "IPVS_SVC_ATTR_AF"),
            IPVS_SVC_ATTR_PROTOCOL => {
                const WHAT: &str = "IPVS_SVC_ATTR_PROTOCOL";
                set_once(&mut s.protocol, a.get(WHAT)?, WHAT)
            }
            IPVS_SVC_ATTR_ADDR => {
                const WHAT: &str = "IPVS_SVC_ATTR_ADDR";
                set_once(&mut s.addr, a.get(WHAT)?, WHAT)
            }
            IPVS_SVC_ATTR_PORT => {
                const WHAT: &str = "IPVS_SVC_ATTR_PORT";
                set_once(&mut s.port, a.get::<Be16>(WHAT)?.0, WHAT)
            }
            IPVS_SVC_ATTR_FWMARK => {
                const WHAT: &str = "IPVS_SVC_ATTR_FWMARK";
                set_once(&mut s.fwmark, a.get(WHAT)?, WHAT)
            }
            IPVS_SVC_ATTR_SCHED_NAME => {
                const WHAT: &str = "IPVS_SVC_ATTR_SCHED_NAME";
                set_once(&mut s.sched_name, a.get::<NulString>(WHAT)?.0, WHAT)
            }
            IPVS_SVC_ATTR_PE_NAME => {
                const WHAT: &str = "IPVS_SVC_ATTR_PE_NAME";
                set_once(&mut s.pe_name, a.get::<NulString>(WHAT)?.0, WHAT)
            }
            IPVS_SVC_ATTR_FLAGS => {
                const WHAT: &str = "IPVS_SVC_ATTR_FLAGS";
                set_once(&mut s.flags, a.get(WHAT)?, WHAT)
            }
            IPVS_SVC_ATTR_TIMEOUT => {
                const WHAT: &str = "IPVS_SVC_ATTR_TIMEOUT";
                set_once(&mut s.timeout, a.get(WHAT)?, WHAT)
            }
            IPVS_SVC_ATTR_NETMASK => {
                const WHAT: &str = "IPVS_SVC_ATTR_NETMASK";
                set_once(&mut s.netmask, a.get(WHAT)?, WHAT)
            }
            _ => Ok(()),
        })?;
        Ok(s)
    }
}

/// The attributes nested under `IPVS_CMD_ATTR_DEST`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct DestAttrs {
    pub addr: Option<InetAddr>,
    pub port: Option<u16>,
    pub fwd_method: Option<u32>,
    pub weight: Option<u32>,
    pub u_thresh: Option<u32>,
    pub l_thresh: Option<u32>,
    pub active_conns: Option<u32>,
    pub inact_conns: Option<u32>,
    pub persist_conns: Option<u32>,
    pub addr_family: Option<u16>,
}

impl Codec for DestAttrs {
    fn encode(&self, out: &mut Vec<u8>) {
        if let Some(addr) = &self.addr {
            put_attr(out, IPVS_DEST_ATTR_ADDR, addr);
        }
        if let Some(port) = self.port {
            put_attr(out, IPVS_DEST_ATTR_PORT, &Be16(port));
        }
        let numbers = [
            (IPVS_DEST_ATTR_FWD_METHOD, self.fwd_method),
            (IPVS_DEST_ATTR_WEIGHT, self.weight),
            (IPVS_DEST_ATTR_U_THRESH, self.u_thresh),
            (IPVS_DEST_ATTR_L_THRESH, self.l_thresh),
            (IPVS_DEST_ATTR_ACTIVE_CONNS, self.active_conns),
            (IPVS_DEST_ATTR_INACT_CONNS, self.inact_conns),
            (IPVS_DEST_ATTR_PERSIST_CONNS, self.persist_conns),
        ];
        for (kind, value) in numbers {
            if let Some(value) = value {
                put_attr(out, kind, &value);
            }
        }
        if let Some(af) = self.addr_family {
            put_attr(out, IPVS_DEST_ATTR_ADDR_FAMILY, &af);
        }
    }

    /// Reads a whole attribute list; attributes kproxy does not use (the
    /// statistics, the tunnel settings) are skipped.
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut d = DestAttrs::default();
        for_each_attr(r.rest(), |a| {
            let (slot, what) = match a.kind {
                IPVS_DEST_ATTR_ADDR => {
                    const WHAT: &str = "IPVS_DEST_ATTR_ADDR";
                    return set_once(&mut d.addr, a.get(WHAT)?, WHAT);
                }
                IPVS_DEST_ATTR_PORT => {
                    const WHAT: &str = "IPVS_DEST_ATTR_PORT";
                    return set_once(&mut d.port, a.get::<Be16>(WHAT)?.0, WHAT);
                }
                IPVS_DEST_ATTR_ADDR_FAMILY => {
                    const WHAT: &str = "IPVS_DEST_ATTR_ADDR_FAMILY";
                    return set_once(&mut d.addr_family, a.get(WHAT)?, WHAT);
                }
                IPVS_DEST_ATTR_FWD_METHOD => (&mut d.fwd_method, "IPVS_DEST_ATTR_FWD_METHOD"),
                IPVS_DEST_ATTR_WEIGHT => (&mut d.weight, "IPVS_DEST_ATTR_WEIGHT"),
                IPVS_DEST_ATTR_U_THRESH => (&mut d.u_thresh, "IPVS_DEST_ATTR_U_THRESH"),
                IPVS_DEST_ATTR_L_THRESH => (&mut d.l_thresh, "IPVS_DEST_ATTR_L_THRESH"),
                IPVS_DEST_ATTR_ACTIVE_CONNS => (&mut d.active_conns, "IPVS_DEST_ATTR_ACTIVE_CONNS"),
                IPVS_DEST_ATTR_INACT_CONNS => (&mut d.inact_conns, "IPVS_DEST_ATTR_INACT_CONNS"),
                IPVS_DEST_ATTR_PERSIST_CONNS => {
                    (&mut d.persist_conns, "IPVS_DEST_ATTR_PERSIST_CONNS")
                }
                _ => return Ok(()),
            };
            set_once(slot, a.get(what)?, what)
        })?;
        Ok(d)
    }
}

/// The connection timeouts of `SET_CONFIG` and of the kernel's answer to
/// `GET_CONFIG`: top-level attributes, u32 seconds each. The kernel leaves a
/// timeout that is absent, or 0, as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TimeoutAttrs {
    pub tcp: Option<u32>,
    pub tcp_fin: Option<u32>,
    pub udp: Option<u32>,
}

impl TimeoutAttrs {
    pub fn is_empty(&self) -> bool {
        *self == TimeoutAttrs::default()
    }
}

impl Codec for TimeoutAttrs {
    fn encode(&self, out: &mut Vec<u8>) {
        let numbers = [
            (IPVS_CMD_ATTR_TIMEOUT_TCP, self.tcp),
            (IPVS_CMD_ATTR_TIMEOUT_TCP_FIN, self.tcp_fin),
            (IPVS_CMD_ATTR_TIMEOUT_UDP, self.udp),
        ];
        for (kind, value) in numbers {
            if let Some(value) = value {
                put_attr(out, kind, &value);
            }
        }
    }

    /// Reads a whole list of command attributes, skipping the others (a
    /// service, a destination).
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut t = TimeoutAttrs::default();
        for_each_attr(r.rest(), |a| {
            let (slot, what) = match a.kind {
                IPVS_CMD_ATTR_TIMEOUT_TCP => (&mut t.tcp, "IPVS_CMD_ATTR_TIMEOUT_TCP"),
                IPVS_CMD_ATTR_TIMEOUT_TCP_FIN => (&mut t.tcp_fin, "IPVS_CMD_ATTR_TIMEOUT_TCP_FIN"),
                IPVS_CMD_ATTR_TIMEOUT_UDP => (&mut t.udp, "IPVS_CMD_ATTR_TIMEOUT_UDP"),
                _ => return Ok(()),
            };
            set_once(slot, a.get(what)?, what)
        })?;
        Ok(t)
    }
}

/// One IPVS generic netlink message: a command and its attributes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IpvsMessage {
    pub cmd: Command,
    pub service: Option<ServiceAttrs>,
    pub dest: Option<DestAttrs>,
    pub timeouts: TimeoutAttrs,
}

impl IpvsMessage {
    pub fn new(cmd: Command) -> Self {
        IpvsMessage {
            cmd,
            service: None,
            dest: None,
            timeouts: TimeoutAttrs::default(),
        }
    }

    pub fn with_service(mut self, service: ServiceAttrs) -> Self {
        self.service = Some(service);
        self
    }

    pub fn with_dest(mut self, dest: DestAttrs) -> Self {
        self.dest = Some(dest);
        self
    }

    pub fn with_timeouts(mut self, timeouts: TimeoutAttrs) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Appends the attributes (what follows the generic netlink header).
    pub fn encode_attrs(&self, out: &mut Vec<u8>) {
        if let Some(service) = &self.service {
            put_nested(out, IPVS_CMD_ATTR_SERVICE, |out| service.encode(out));
        }
        if let Some(dest) = &self.dest {
            put_nested(out, IPVS_CMD_ATTR_DEST, |out| dest.encode(out));
        }
        self.timeouts.encode(out);
    }

    /// Decodes the attributes that follow a generic netlink header carrying
    /// command `cmd`.
    pub fn decode(cmd: u8, attrs: &[u8]) -> Result<Self, DecodeError> {
        let mut msg = IpvsMessage::new(Command::from_code(cmd)?);
        for_each_attr(attrs, |a| match a.kind {
            IPVS_CMD_ATTR_SERVICE => {
                const WHAT: &str = "IPVS_CMD_ATTR_SERVICE";
                set_once(&mut msg.service, a.get(WHAT)?, WHAT)
            }
            IPVS_CMD_ATTR_DEST => {
                const WHAT: &str = "IPVS_CMD_ATTR_DEST";
                set_once(&mut msg.dest, a.get(WHAT)?, WHAT)
            }
            _ => Ok(()),
        })?;
        // The timeouts sit beside the nests in the same list; they read it
        // again for theirs (a few attributes, a second pass costs nothing).
        msg.timeouts = TimeoutAttrs::decode(attrs, "IPVS command attributes")?;
        Ok(msg)
    }
}

fn protocol_name(protocol: u16) -> Option<&'static str> {
    match protocol {
        IPPROTO_TCP => Some("TCP"),
        IPPROTO_UDP => Some("UDP"),
        IPPROTO_SCTP => Some("SCTP"),
        _ => None,
    }
}

/// As ipvsadm names a virtual server: `TCP 10.0.0.1:80`, `UDP [fd00::1]:53`,
/// `FWM 7`.
impl fmt::Display for ServiceAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(mark) = self.fwmark {
            return write!(f, "FWM {mark}");
        }
        match self.protocol.map(|p| (p, protocol_name(p))) {
            Some((_, Some(name))) => write!(f, "{name} ")?,
            Some((number, None)) => write!(f, "protocol {number} ")?,
            None => f.write_str("protocol ? ")?,
        }
        let ip = self.addr.zip(self.af).and_then(|(addr, af)| addr.ip(af));
        match (ip, self.port) {
            (Some(ip), Some(port)) => write!(f, "{}", std::net::SocketAddr::new(ip, port)),
            (Some(ip), None) => write!(f, "{ip}:?"),
            (None, Some(port)) => write!(f, "?:{port}"),
            (None, None) => f.write_str("?"),
        }
    }
}

impl fmt::Display for DestAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let af = self.addr_family.unwrap_or(AF_INET);
        match (self.addr.and_then(|a| a.ip(af)), self.port) {
            (Some(ip), Some(port)) => write!(f, "{}", std::net::SocketAddr::new(ip, port)),
            (Some(ip), None) => write!(f, "{ip}:?"),
            _ => f.write_str("?"),
        }
    }
}

/// As kproxy logs what it sets: `tcp 900s, udp 30s`; `nothing` when empty.
impl fmt::Display for TimeoutAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fields = [
            ("tcp", self.tcp),
            ("tcpfin", self.tcp_fin),
            ("udp", self.udp),
        ];
        let mut sep = "";
        for (name, value) in fields {
            if let Some(secs) = value {
                write!(f, "{sep}{name} {secs}s")?;
                sep = ", ";
            }
        }
        if sep.is_empty() {
            f.write_str("nothing")?;
        }
        Ok(())
    }
}

/// What the message asks for, for error messages: `add destination
/// 10.0.0.1:80 to TCP 10.96.0.1:80`.
impl fmt::Display for IpvsMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let none = ServiceAttrs::default();
        let svc = self.service.as_ref().unwrap_or(&none);
        let no_dest = DestAttrs::default();
        let dest = self.dest.as_ref().unwrap_or(&no_dest);
        match self.cmd {
            Command::NewService => write!(f, "add virtual server {svc}"),
            Command::SetService => write!(f, "update virtual server {svc}"),
            Command::DelService => write!(f, "delete virtual server {svc}"),
            Command::GetService => f.write_str("list virtual servers"),
            Command::NewDest => write!(f, "add destination {dest} to {svc}"),
            Command::SetDest => write!(f, "update destination {dest} of {svc}"),
            Command::DelDest => write!(f, "delete destination {dest} from {svc}"),
            Command::GetDest => write!(f, "list destinations of {svc}"),
            Command::SetConfig => write!(f, "set IPVS timeouts ({})", self.timeouts),
            Command::GetConfig => f.write_str("read IPVS timeouts"),
            Command::Flush => f.write_str("flush all virtual servers"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_service() -> ServiceAttrs {
        ServiceAttrs {
            af: Some(AF_INET),
            protocol: Some(IPPROTO_UDP),
            addr: Some(InetAddr::from(IpAddr::from([10, 96, 0, 10]))),
            port: Some(53),
            sched_name: Some("rr".into()),
            flags: Some(SvcFlags {
                flags: 0,
                mask: u32::MAX,
            }),
            timeout: Some(0),
            netmask: Some(u32::MAX),
            ..Default::default()
        }
    }

    #[test]
    fn commands_have_the_header_numbers() {
        let all = [
            (Command::NewService, 1),
            (Command::SetService, 2),
            (Command::DelService, 3),
            (Command::GetService, 4),
            (Command::NewDest, 5),
            (Command::SetDest, 6),
            (Command::DelDest, 7),
            (Command::GetDest, 8),
            (Command::SetConfig, 12),
            (Command::GetConfig, 13),
            (Command::Flush, 17),
        ];
        for (cmd, code) in all {
            assert_eq!(cmd.code(), code);
            assert_eq!(Command::from_code(code), Ok(cmd));
        }
        assert_eq!(Command::from_code(9), Err(DecodeError::UnknownCommand(9)));
    }

    #[test]
    fn ipv4_addresses_are_padded_to_16_bytes() {
        let addr = InetAddr::from(IpAddr::from([10, 96, 0, 10]));
        assert_eq!(
            addr.encoded(),
            [10, 96, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(addr.ip(AF_INET), Some(IpAddr::from([10, 96, 0, 10])));
        let v6: IpAddr = "fd00::10".parse().unwrap();
        assert_eq!(InetAddr::from(v6).ip(AF_INET6), Some(v6));
        assert_eq!(InetAddr::from(v6).ip(99), None);
        assert!(InetAddr::decode(&[0; 4], "addr").is_err());
        assert!(InetAddr::decode(&[0; 17], "addr").is_err());
    }

    #[test]
    fn service_attributes_round_trip() {
        let svc = v4_service();
        assert_eq!(ServiceAttrs::decode(&svc.encoded(), "svc"), Ok(svc));
        let fwm = ServiceAttrs {
            af: Some(AF_INET6),
            fwmark: Some(7),
            pe_name: Some("sip".into()),
            ..Default::default()
        };
        assert_eq!(ServiceAttrs::decode(&fwm.encoded(), "svc"), Ok(fwm));
    }

    #[test]
    fn destination_attributes_round_trip() {
        let dest = DestAttrs {
            addr: Some(InetAddr::from("fd00::1".parse::<IpAddr>().unwrap())),
            port: Some(8080),
            fwd_method: Some(IP_VS_CONN_F_MASQ),
            weight: Some(1),
            u_thresh: Some(0),
            l_thresh: Some(0),
            active_conns: Some(3),
            inact_conns: Some(4),
            persist_conns: Some(5),
            addr_family: Some(AF_INET6),
        };
        assert_eq!(DestAttrs::decode(&dest.encoded(), "dest"), Ok(dest));
    }

    #[test]
    fn a_wrong_length_inside_a_service_is_named() {
        let mut attrs = Vec::new();
        put_attr(&mut attrs, IPVS_SVC_ATTR_AF, &AF_INET);
        put_attr(&mut attrs, IPVS_SVC_ATTR_PORT, &80u32);
        assert_eq!(
            ServiceAttrs::decode(&attrs, "svc"),
            Err(DecodeError::TrailingBytes {
                what: "IPVS_SVC_ATTR_PORT",
                count: 2
            })
        );
        let mut attrs = Vec::new();
        put_attr(&mut attrs, IPVS_SVC_ATTR_FLAGS, &1u32);
        assert!(matches!(
            ServiceAttrs::decode(&attrs, "svc"),
            Err(DecodeError::Truncated { .. })
        ));
        let mut attrs = Vec::new();
        put_attr(&mut attrs, IPVS_DEST_ATTR_WEIGHT, &1u16);
        assert!(matches!(
            DestAttrs::decode(&attrs, "dest"),
            Err(DecodeError::Truncated { .. })
        ));
    }

    #[test]
    fn duplicate_attributes_are_rejected() {
        let mut attrs = Vec::new();
        put_attr(&mut attrs, IPVS_DEST_ATTR_WEIGHT, &1u32);
        put_attr(&mut attrs, IPVS_DEST_ATTR_WEIGHT, &2u32);
        assert_eq!(
            DestAttrs::decode(&attrs, "dest"),
            Err(DecodeError::Duplicate("IPVS_DEST_ATTR_WEIGHT"))
        );
        let msg = IpvsMessage::new(Command::NewService).with_service(v4_service());
        let mut twice = Vec::new();
        msg.encode_attrs(&mut twice);
        msg.encode_attrs(&mut twice);
        assert_eq!(
            IpvsMessage::decode(IPVS_CMD_NEW_SERVICE, &twice),
            Err(DecodeError::Duplicate("IPVS_CMD_ATTR_SERVICE"))
        );
    }

    #[test]
    fn messages_round_trip_and_skip_unknown_attributes() {
        let msg = IpvsMessage::new(Command::NewDest)
            .with_service(v4_service())
            .with_dest(DestAttrs {
                port: Some(53),
                ..Default::default()
            });
        let mut attrs = Vec::new();
        msg.encode_attrs(&mut attrs);
        put_nested(&mut attrs, IPVS_CMD_ATTR_DAEMON, |out| {
            put_attr(out, 1, &1u32)
        });
        put_attr(&mut attrs, 99, &0u32);
        assert_eq!(IpvsMessage::decode(IPVS_CMD_NEW_DEST, &attrs), Ok(msg));
    }

    /// Bytes sent as they are, for values of the wrong size.
    struct Raw(Vec<u8>);

    impl Codec for Raw {
        fn encode(&self, out: &mut Vec<u8>) {
            out.extend_from_slice(&self.0);
        }

        fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
            Ok(Raw(r.rest().to_vec()))
        }
    }

    fn timeouts() -> TimeoutAttrs {
        TimeoutAttrs {
            tcp: Some(900),
            tcp_fin: Some(120),
            udp: Some(300),
        }
    }

    #[test]
    fn timeouts_are_top_level_u32_attributes() {
        let mut attrs = Vec::new();
        IpvsMessage::new(Command::SetConfig)
            .with_timeouts(timeouts())
            .encode_attrs(&mut attrs);
        let mut expected = Vec::new();
        for (kind, secs) in [(4u16, 900u32), (5, 120), (6, 300)] {
            expected.extend_from_slice(&8u16.to_ne_bytes());
            expected.extend_from_slice(&kind.to_ne_bytes());
            expected.extend_from_slice(&secs.to_ne_bytes());
        }
        assert_eq!(attrs, expected);
        // Only what is set is sent: the kernel leaves the rest alone.
        let udp_only = TimeoutAttrs {
            udp: Some(30),
            ..Default::default()
        };
        let mut one = Vec::new();
        one.extend_from_slice(&8u16.to_ne_bytes());
        one.extend_from_slice(&6u16.to_ne_bytes());
        one.extend_from_slice(&30u32.to_ne_bytes());
        assert_eq!(udp_only.encoded(), one);
        assert!(TimeoutAttrs::default().encoded().is_empty());
    }

    #[test]
    fn messages_describe_themselves_as_ipvsadm_would() {
        let msg = IpvsMessage::new(Command::NewDest)
            .with_service(v4_service())
            .with_dest(DestAttrs {
                addr: Some(InetAddr::from(IpAddr::from([10, 0, 0, 1]))),
                port: Some(53),
                addr_family: Some(AF_INET),
                ..Default::default()
            });
        assert_eq!(
            msg.to_string(),
            "add destination 10.0.0.1:53 to UDP 10.96.0.10:53"
        );
        let fwm = ServiceAttrs {
            fwmark: Some(5),
            ..Default::default()
        };
        assert_eq!(fwm.to_string(), "FWM 5");
        let odd = ServiceAttrs {
            af: Some(AF_INET6),
            protocol: Some(47),
            addr: Some(InetAddr::from("fd00::1".parse::<IpAddr>().unwrap())),
            port: Some(1),
            ..Default::default()
        };
        assert_eq!(odd.to_string(), "protocol 47 [fd00::1]:1");
    }

    #[test]
    fn a_get_config_answer_decodes_into_timeouts() {
        // As the kernel answers GET_CONFIG: command SET_CONFIG, three u32s.
        let mut attrs = Vec::new();
        put_attr(&mut attrs, IPVS_CMD_ATTR_TIMEOUT_TCP, &900u32);
        put_attr(&mut attrs, IPVS_CMD_ATTR_TIMEOUT_TCP_FIN, &120u32);
        put_attr(&mut attrs, IPVS_CMD_ATTR_TIMEOUT_UDP, &300u32);
        let msg = IpvsMessage::decode(IPVS_CMD_SET_CONFIG, &attrs).unwrap();
        assert_eq!(msg.cmd, Command::SetConfig);
        assert_eq!(msg.timeouts, timeouts());
        assert_eq!((msg.service, msg.dest), (None, None));
        // A kernel built without UDP support leaves that one out.
        let msg = IpvsMessage::decode(IPVS_CMD_SET_CONFIG, &attrs[..16]).unwrap();
        assert_eq!(msg.timeouts.udp, None);
        assert_eq!(msg.timeouts.tcp_fin, Some(120));
    }

    #[test]
    fn malformed_timeouts_are_rejected() {
        // A value with bytes after its u32.
        let mut attrs = Vec::new();
        let mut long = 900u32.encoded();
        long.extend_from_slice(&[0; 4]);
        put_attr(&mut attrs, IPVS_CMD_ATTR_TIMEOUT_TCP, &Raw(long));
        assert_eq!(
            IpvsMessage::decode(IPVS_CMD_SET_CONFIG, &attrs),
            Err(DecodeError::TrailingBytes {
                what: "IPVS_CMD_ATTR_TIMEOUT_TCP",
                count: 4
            })
        );
        // A value too short.
        let mut attrs = Vec::new();
        put_attr(&mut attrs, IPVS_CMD_ATTR_TIMEOUT_UDP, &300u16);
        assert!(matches!(
            IpvsMessage::decode(IPVS_CMD_SET_CONFIG, &attrs),
            Err(DecodeError::Truncated { .. })
        ));
        // Stray bytes after the last attribute.
        let mut attrs = timeouts().encoded();
        attrs.extend_from_slice(&[8, 0]);
        assert!(matches!(
            IpvsMessage::decode(IPVS_CMD_SET_CONFIG, &attrs),
            Err(DecodeError::Truncated {
                what: "attribute type",
                ..
            })
        ));
        // The same timeout twice.
        let mut attrs = timeouts().encoded();
        put_attr(&mut attrs, IPVS_CMD_ATTR_TIMEOUT_UDP, &30u32);
        assert_eq!(
            IpvsMessage::decode(IPVS_CMD_SET_CONFIG, &attrs),
            Err(DecodeError::Duplicate("IPVS_CMD_ATTR_TIMEOUT_UDP"))
        );
    }

    #[test]
    fn config_messages_describe_themselves() {
        let msg = IpvsMessage::new(Command::SetConfig).with_timeouts(TimeoutAttrs {
            tcp: Some(900),
            udp: Some(30),
            ..Default::default()
        });
        assert_eq!(msg.to_string(), "set IPVS timeouts (tcp 900s, udp 30s)");
        assert_eq!(
            IpvsMessage::new(Command::GetConfig).to_string(),
            "read IPVS timeouts"
        );
        assert_eq!(TimeoutAttrs::default().to_string(), "nothing");
        assert!(TimeoutAttrs::default().is_empty());
        assert!(!timeouts().is_empty());
    }
}
