//! Reads one YAML or JSON document holding an object or a list of objects, and
//! hands each object to the inventory as soon as it is read. A list's items
//! are streamed one at a time, so a large `kind: List` is never held whole as
//! a value tree.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use tracing::{debug, warn};

use crate::inventory::Inventory;

/// Where an object came from, for log lines.
#[derive(Clone, Copy, Debug)]
pub struct Origin<'a> {
    pub file: &'a str,
    /// From 1.
    pub document: usize,
    /// The document's first content line, when known.
    pub line: Option<usize>,
    /// The position in a list, from 0.
    pub item: Option<usize>,
}

impl fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.file, self.document)?;
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        if let Some(item) = self.item {
            write!(f, " item {item}")?;
        }
        Ok(())
    }
}

/// Deserializes one document into `inventory`. Every error it returns comes
/// from the format itself (syntax), never from the shape of an object: objects
/// are read as plain values first and checked by the inventory.
pub struct DocumentSeed<'i, 'o> {
    pub inventory: &'i mut Inventory,
    pub origin: Origin<'o>,
}

impl<'de> DeserializeSeed<'de> for DocumentSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DocumentSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Kubernetes object or list")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        self.not_an_object();
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        self.not_an_object();
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        self.not_an_object();
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        self.not_an_object();
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        self.not_an_object();
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        self.not_an_object();
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut list = ListItems::new(self.inventory, self.origin);
        let mut fields = Map::new();
        let mut is_list = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" {
                is_list = true;
                map.next_value_seed(ItemsSeed { list: &mut list })?;
            } else {
                let value: Value = map.next_value()?;
                fields.insert(key, value);
            }
        }
        if is_list {
            list.finish(&fields);
        } else {
            list.inventory
                .add_value(Value::Object(fields), &self.origin);
        }
        Ok(())
    }
}

impl DocumentSeed<'_, '_> {
    fn not_an_object(self) {
        warn!("{}: not an object; skipped", self.origin);
        self.inventory.counts.skipped += 1;
    }
}

/// The items of a list, handed to the inventory as they come. Items of a typed
/// list (ServiceList, ...) may leave out their kind: those wait for the list's.
pub struct ListItems<'i, 'o> {
    inventory: &'i mut Inventory,
    origin: Origin<'o>,
    next: usize,
    kindless: Vec<(Origin<'o>, Value)>,
}

impl<'i, 'o> ListItems<'i, 'o> {
    pub fn new(inventory: &'i mut Inventory, origin: Origin<'o>) -> Self {
        ListItems {
            inventory,
            origin,
            next: 0,
            kindless: Vec::new(),
        }
    }

    /// The next item; `line` is where it starts, when known.
    pub fn push(&mut self, item: Value, line: Option<usize>) {
        let origin = Origin {
            item: Some(self.next),
            line: line.or(self.origin.line),
            ..self.origin
        };
        self.next += 1;
        if !item.is_object() {
            warn!("{origin}: list item is not an object; skipped");
            self.inventory.counts.skipped += 1;
        } else if item.get("kind").and_then(Value::as_str).is_some() {
            self.inventory.add_value(item, &origin);
        } else {
            self.kindless.push((origin, item));
        }
    }

    /// Ends the list; `fields` are its other top-level fields.
    pub fn finish(self, fields: &Map<String, Value>) {
        if self.kindless.is_empty() {
            return;
        }
        let list_kind = fields.get("kind").and_then(Value::as_str).unwrap_or("");
        let Some(kind) = list_kind.strip_suffix("List").filter(|k| !k.is_empty()) else {
            warn!(
                "{}: {} list items without a kind skipped",
                self.origin,
                self.kindless.len()
            );
            self.inventory.counts.skipped += self.kindless.len();
            return;
        };
        for (origin, mut item) in self.kindless {
            if let Value::Object(obj) = &mut item {
                obj.insert("kind".into(), Value::String(kind.to_string()));
                if let Some(v) = fields
                    .get("apiVersion")
                    .filter(|_| !obj.contains_key("apiVersion"))
                {
                    obj.insert("apiVersion".into(), v.clone());
                }
            }
            self.inventory.add_value(item, &origin);
        }
    }
}

struct ItemsSeed<'l, 'i, 'o> {
    list: &'l mut ListItems<'i, 'o>,
}

impl<'de> DeserializeSeed<'de> for ItemsSeed<'_, '_, '_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ItemsSeed<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of Kubernetes objects")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(item) = seq.next_element::<Value>()? {
            self.list.push(item, None);
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        debug!("{}: `items` is not a list; ignored", self.list.origin);
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        debug!("{}: `items` is not a list; ignored", self.list.origin);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_yaml(text: &str) -> Inventory {
        let mut inv = Inventory::default();
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            DocumentSeed {
                inventory: &mut inv,
                origin: Origin {
                    file: "t.yaml",
                    document: i + 1,
                    line: None,
                    item: None,
                },
            }
            .deserialize(doc)
            .unwrap();
        }
        inv
    }

    const SVC: &str = "apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
";

    #[test]
    fn reads_single_objects() {
        let inv = read_yaml(SVC);
        assert_eq!(inv.services.len(), 1);
        assert_eq!(inv.services.iter().next().unwrap().name, "a");
    }

    #[test]
    fn reads_lists_whatever_the_key_order() {
        let text = "items:
- apiVersion: v1
  kind: Service
  metadata: {name: a, namespace: ns}
  spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
- apiVersion: v1
  kind: Node
  metadata: {name: n}
kind: List
apiVersion: v1
metadata: {resourceVersion: ''}
";
        let inv = read_yaml(text);
        assert_eq!(inv.services.len(), 1);
        assert_eq!(inv.nodes.len(), 1);
    }

    #[test]
    fn typed_lists_lend_their_kind_to_items() {
        let text = "apiVersion: v1
kind: ServiceList
items:
- metadata: {name: a, namespace: ns}
  spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
";
        assert_eq!(read_yaml(text).services.len(), 1);
    }

    #[test]
    fn empty_documents_and_scalars_are_harmless() {
        let inv = read_yaml("---\n---\nfoo\n---\n[1, 2]\n---\nitems: null\nkind: List\n");
        assert_eq!(inv.counts.skipped, 2);
        assert_eq!(inv.counts.objects, 0);
    }

    #[test]
    fn json_lists_stream_too() {
        let text = r#"{"apiVersion": "v1", "items": [{"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "a", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}], "kind": "List"}"#;
        let mut inv = Inventory::default();
        let mut de = serde_json::Deserializer::from_str(text);
        DocumentSeed {
            inventory: &mut inv,
            origin: Origin {
                file: "t.json",
                document: 1,
                line: None,
                item: None,
            },
        }
        .deserialize(&mut de)
        .unwrap();
        de.end().unwrap();
        assert_eq!(inv.services.len(), 1);
    }
}
