//! The original bytes of the requests podckptd changes and passes on
//! (RestorePod's configs, CreateContainer from an archive), and unary CRI
//! calls that send such bytes as they are: see [`super::wire`] for why.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes};
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::Status;
use tower::Service;

use super::client::MAX_MESSAGE_SIZE;
use super::wire::grpc_payload;

/// The request message's bytes as the caller encoded them, in the
/// request's extensions for the handlers of [`CAPTURED`] methods.
#[derive(Clone, Debug)]
pub struct RawMessage(pub Bytes);

/// When the request reached podckptd's server, in every request's
/// extensions: a caller's `grpc-timeout` counts from then, not from when
/// its handler starts (reading a large request takes time).
#[derive(Clone, Copy, Debug)]
pub struct Arrived(pub std::time::Instant);

/// Methods whose request bytes [`CaptureRaw`] keeps.
pub const CAPTURED: [&str; 2] = [
    "/runtime.v1.RuntimeService/RestorePod",
    "/runtime.v1.RuntimeService/CreateContainer",
];

/// Wraps podckptd's gRPC server: notes when each request [`Arrived`]; for
/// the [`CAPTURED`] methods it also reads the
/// request body (unary, bounded by [`MAX_MESSAGE_SIZE`]), records its
/// message as a [`RawMessage`] extension and hands the same bytes on.
#[derive(Clone, Debug)]
pub struct CaptureRaw<S> {
    inner: S,
}

impl<S> CaptureRaw<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for CaptureRaw<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for CaptureRaw<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        req.extensions_mut()
            .insert(Arrived(std::time::Instant::now()));
        // The clone that was made ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !CAPTURED.contains(&req.uri().path()) {
            return Box::pin(inner.call(req.map(Body::new)));
        }
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            // A gRPC frame header plus the largest message accepted.
            let collected = match Limited::new(body, MAX_MESSAGE_SIZE + 5).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) => {
                    return Ok(Status::resource_exhausted(format!(
                        "reading the request: {e} (limit {MAX_MESSAGE_SIZE} bytes)"
                    ))
                    .into_http());
                }
            };
            if let Some(message) = grpc_payload(&collected) {
                parts.extensions.insert(RawMessage(message));
            }
            inner
                .call(http::Request::from_parts(
                    parts,
                    Body::new(Full::new(collected)),
                ))
                .await
        })
    }
}

/// Sends already encoded messages, decodes `M` answers.
struct RawCodec<M>(PhantomData<M>);

struct RawEncoder;

struct RawDecoder<M>(PhantomData<M>);

impl<M: prost::Message + Default + Send + 'static> Codec for RawCodec<M> {
    type Encode = Bytes;
    type Decode = M;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder<M>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder<M> {
        RawDecoder(PhantomData)
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl<M: prost::Message + Default> Decoder for RawDecoder<M> {
    type Item = M;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<M>, Status> {
        let m = M::decode(src.copy_to_bytes(src.remaining()))
            .map_err(|e| Status::internal(format!("decoding the runtime's answer: {e}")))?;
        Ok(Some(m))
    }
}

/// A unary call of `path` (`/runtime.v1.RuntimeService/Method`) with an
/// already encoded request message.
pub async fn unary<M: prost::Message + Default + Send + 'static>(
    channel: Channel,
    path: &'static str,
    message: Vec<u8>,
) -> Result<M, Status> {
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("runtime connection not ready: {e}")))?;
    let resp = grpc
        .unary(
            tonic::Request::new(Bytes::from(message)),
            http::uri::PathAndQuery::from_static(path),
            RawCodec::<M>(PhantomData),
        )
        .await?;
    Ok(resp.into_inner())
}
