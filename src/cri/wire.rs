//! Protobuf wire-level editing, so that a CRI message podckptd decodes,
//! changes and sends on keeps everything it does not know.
//!
//! prost drops fields it has no number for, so a message decoded and
//! re-encoded loses whatever a newer kubelet added to the CRI. Instead,
//! podckptd keeps the caller's original bytes and patches only the fields
//! it changed: [`patch`] compares the decoded message before and after the
//! change field number by field number, drops the changed numbers'
//! occurrences from the original and appends their new encodings (a
//! singular sub-message that carried unknown fields of its own is patched
//! the same way, recursively). Everything else, known or not, goes on
//! byte for byte.

use bytes::Bytes;
use prost::Message;

/// A message that is not valid protobuf wire format.
#[derive(Debug, thiserror::Error)]
#[error("malformed protobuf message: {0}")]
pub struct WireError(&'static str);

const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

/// One field occurrence of an encoded message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field<'a> {
    /// The field number.
    pub number: u32,
    /// The wire type (0 varint, 1 i64, 2 length-delimited, 5 i32).
    pub wire_type: u8,
    /// The whole occurrence: key and value, as encoded.
    pub raw: &'a [u8],
    /// The payload of a length-delimited field (empty for the others).
    pub value: &'a [u8],
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, WireError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or(WireError("truncated varint"))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(WireError("varint longer than 10 bytes"))
}

/// The field occurrences of an encoded message, in order.
pub fn fields(buf: &[u8]) -> Result<Vec<Field<'_>>, WireError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let key = varint(buf, &mut pos)?;
        let number = u32::try_from(key >> 3).map_err(|_| WireError("field number too large"))?;
        if number == 0 {
            return Err(WireError("field number 0"));
        }
        let wire_type = (key & 7) as u8;
        let mut value: &[u8] = &[];
        match wire_type {
            VARINT => {
                varint(buf, &mut pos)?;
            }
            I64 => pos += 8,
            I32 => pos += 4,
            LEN => {
                let len = usize::try_from(varint(buf, &mut pos)?)
                    .map_err(|_| WireError("length too large"))?;
                let end = pos.checked_add(len).ok_or(WireError("length too large"))?;
                value = buf.get(pos..end).ok_or(WireError("truncated field"))?;
                pos = end;
            }
            // Groups (3, 4) are proto2-only and absent from the CRI.
            _ => return Err(WireError("unsupported wire type")),
        }
        if pos > buf.len() {
            return Err(WireError("truncated field"));
        }
        out.push(Field {
            number,
            wire_type,
            raw: &buf[start..pos],
            value,
        });
    }
    Ok(out)
}

fn occurrences<'a>(fields: &[Field<'a>], number: u32) -> Vec<Field<'a>> {
    fields
        .iter()
        .filter(|f| f.number == number)
        .copied()
        .collect()
}

fn concat(fields: &[Field<'_>]) -> Vec<u8> {
    fields.iter().flat_map(|f| f.raw.iter().copied()).collect()
}

/// Applies the change from `before` to `after` (both encodings of the
/// decoded message) to `original` (the bytes it was decoded from): field
/// numbers whose encoding is the same in both keep their original bytes,
/// unknown fields included; the others are dropped from the original and
/// their new encoding appended.
pub fn patch(original: &[u8], before: &[u8], after: &[u8]) -> Result<Vec<u8>, WireError> {
    if before == after {
        return Ok(original.to_vec());
    }
    let o = fields(original)?;
    let b = fields(before)?;
    let a = fields(after)?;
    let mut changed: Vec<u32> = Vec::new();
    for f in b.iter().chain(a.iter()) {
        if changed.contains(&f.number) {
            continue;
        }
        if concat(&occurrences(&b, f.number)) != concat(&occurrences(&a, f.number)) {
            changed.push(f.number);
        }
    }
    let mut out: Vec<u8> = o
        .iter()
        .filter(|f| !changed.contains(&f.number))
        .flat_map(|f| f.raw.iter().copied())
        .collect();
    for n in changed {
        let (on, bn, an) = (occurrences(&o, n), occurrences(&b, n), occurrences(&a, n));
        // A singular sub-message whose original carried more than its
        // decoded form (unknown fields inside): patch it in turn.
        if let ([of], [bf], [af]) = (&on[..], &bn[..], &an[..]) {
            if of.wire_type == LEN
                && bf.wire_type == LEN
                && af.wire_type == LEN
                && of.value != bf.value
            {
                if let Ok(inner) = patch(of.value, bf.value, af.value) {
                    prost::encoding::bytes::encode(n, &inner, &mut out);
                    continue;
                }
            }
        }
        out.extend(concat(&an));
    }
    Ok(out)
}

/// A message decoded from bytes it keeps: [`Preserved::encode`] gives the
/// original bytes with only the changes made to `msg` patched in.
#[derive(Clone, Debug)]
pub struct Preserved<M> {
    original: Bytes,
    decoded: M,
    /// The message; change it freely.
    pub msg: M,
}

impl<M: Message + Default + Clone> Preserved<M> {
    /// Decodes `original`, keeping it.
    pub fn decode(original: Bytes) -> Result<Self, prost::DecodeError> {
        let decoded = M::decode(original.clone())?;
        Ok(Self {
            original,
            msg: decoded.clone(),
            decoded,
        })
    }

    /// A message that came without its bytes (built in-process): its own
    /// encoding is the original.
    pub fn from_message(msg: M) -> Self {
        Self {
            original: msg.encode_to_vec().into(),
            decoded: msg.clone(),
            msg,
        }
    }

    /// The original bytes with the changes made to `msg` patched in.
    pub fn encode(&self) -> Vec<u8> {
        let (before, after) = (self.decoded.encode_to_vec(), self.msg.encode_to_vec());
        // The original decoded, so it parses; a failure here would be a bug
        // in `fields`: fall back to the plain encoding rather than fail.
        patch(&self.original, &before, &after).unwrap_or(after)
    }
}

/// The payload of the first gRPC frame of a request body: uncompressed
/// messages only (podckptd's server accepts no compression).
pub fn grpc_payload(body: &[u8]) -> Option<Bytes> {
    let (head, rest) = body.split_first_chunk::<5>()?;
    if head[0] != 0 {
        return None;
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    rest.get(..len).map(Bytes::copy_from_slice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cri::api::{ContainerConfig, ContainerMetadata, ImageSpec, KeyValue};

    fn with_unknown(mut bytes: Vec<u8>, number: u32, payload: &[u8]) -> Vec<u8> {
        prost::encoding::bytes::encode(number, &payload.to_vec(), &mut bytes);
        bytes
    }

    #[test]
    fn unchanged_message_is_byte_for_byte() {
        let c = ContainerConfig {
            command: vec!["a".into()],
            ..Default::default()
        };
        let raw = with_unknown(c.encode_to_vec(), 4000, b"future");
        let p = Preserved::<ContainerConfig>::decode(raw.clone().into()).unwrap();
        assert_eq!(p.encode(), raw);
    }

    #[test]
    fn a_changed_field_is_replaced_and_unknown_ones_stay() {
        let c = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "c".into(),
                attempt: 3,
            }),
            image: Some(ImageSpec {
                image: "old".into(),
                ..Default::default()
            }),
            envs: vec![KeyValue {
                key: "B".into(),
                value: vec![0xff, 0x00, 0xfe],
            }],
            ..Default::default()
        };
        // An unknown field at the top and one inside `image`.
        let mut image = c.image.clone().unwrap().encode_to_vec();
        image = with_unknown(image, 77, b"inner");
        let mut raw = Vec::new();
        for f in fields(&c.encode_to_vec()).unwrap() {
            if f.number == 2 {
                prost::encoding::bytes::encode(2, &image, &mut raw);
            } else {
                raw.extend_from_slice(f.raw);
            }
        }
        let raw = with_unknown(raw, 5000, b"top");
        let mut p = Preserved::<ContainerConfig>::decode(raw.into()).unwrap();
        p.msg.image.as_mut().unwrap().image = "new".into();
        p.msg.metadata.as_mut().unwrap().attempt = 0;
        let out = p.encode();
        let back = ContainerConfig::decode(&out[..]).unwrap();
        assert_eq!(back.image.as_ref().unwrap().image, "new");
        assert_eq!(back.metadata.as_ref().unwrap().attempt, 0);
        assert_eq!(back.envs[0].value, vec![0xff, 0x00, 0xfe]);
        let top = fields(&out).unwrap();
        let future = top.iter().find(|f| f.number == 5000).expect("kept");
        assert_eq!(future.value, b"top");
        let img = top.iter().find(|f| f.number == 2).unwrap();
        let inner = fields(img.value).unwrap();
        assert!(inner.iter().any(|f| f.number == 77 && f.value == b"inner"));
    }

    #[test]
    fn malformed_input_is_an_error() {
        assert!(fields(&[0x0a, 0x05, 1]).is_err());
        assert!(fields(&[0x00]).is_err());
        assert!(fields(&[0x80]).is_err());
    }

    #[test]
    fn grpc_frames() {
        assert_eq!(
            grpc_payload(&[0, 0, 0, 0, 2, 7, 8, 9]).unwrap(),
            &[7, 8][..]
        );
        assert!(grpc_payload(&[1, 0, 0, 0, 1, 7]).is_none());
        assert!(grpc_payload(&[0, 0, 0, 0, 3, 7]).is_none());
    }
}
