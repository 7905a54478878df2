//! JSON form of the CRI's `bytes` env values: a string when the bytes are
//! UTF-8 (as runtimes built before cri-api 1.34 wrote them, and as people
//! read them), else an array of byte values. Either form is read back.

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserializer, Serializer};

/// Serializes `v` as a string if it is UTF-8, else as an array of bytes.
pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    match std::str::from_utf8(v) {
        Ok(text) => s.serialize_str(text),
        Err(_) => s.collect_seq(v),
    }
}

/// Reads a string, bytes, or an array of byte values.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or an array of bytes")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            Ok(v.as_bytes().to_vec())
        }
        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_unit<E: de::Error>(self) -> Result<Vec<u8>, E> {
            Ok(Vec::new())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}

#[cfg(test)]
mod tests {
    use crate::cri::api::KeyValue;

    #[test]
    fn text_and_binary_values_round_trip() {
        for value in [b"plain".to_vec(), vec![0xff, 0, 0x80]] {
            let kv = KeyValue {
                key: "K".into(),
                value: value.clone(),
            };
            let json = serde_json::to_string(&kv).unwrap();
            let back: KeyValue = serde_json::from_str(&json).unwrap();
            assert_eq!(back.value, value, "{json}");
        }
        let old: KeyValue = serde_json::from_str(r#"{"key":"A","value":"b c"}"#).unwrap();
        assert_eq!(old.value, b"b c");
    }
}
