# kproxy's image: kproxy built from this workspace, on a small Debian with the
# programs kproxy runs. No registry is assumed:
#   docker build -t registry.example.com/kproxy:0.1.0 .
# and set that image in your deploy/ overlay (see deploy/README.md).
# tests/image.rs checks this file against the workspace.

ARG DEBIAN_RELEASE=bookworm

# Build on the same Debian release as the runtime, so that the binary's glibc
# is there.
FROM rust:1-${DEBIAN_RELEASE} AS build
WORKDIR /src
# The whole workspace: cargo reads every member's manifest, and Cargo.lock
# pins the dependencies (--locked).
COPY . .
RUN cargo build --release --locked -p kproxy

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# iptables: iptables-nft* and iptables-legacy* (kproxy uses the backend the
# node uses); ipset and ipvsadm: IPVS mode's sets and a way to look at its
# virtual servers; kmod: modprobe; conntrack: inspecting and flushing
# conntrack entries; iproute2: `ip` for the node's addresses and kube-ipvs0.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        conntrack \
        iproute2 \
        ipset \
        iptables \
        ipvsadm \
        kmod \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kproxy /usr/local/bin/kproxy
ENTRYPOINT ["/usr/local/bin/kproxy"]
