//! One response body type for both whole JSON documents and never-ending watch streams.

use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::{Body, Bytes, Frame, SizeHint};
use tokio::sync::mpsc;

/// Returned by a watch body when the server drops the watch on purpose: hyper then tears the
/// connection down without the terminating chunk, as a crashing API server would.
#[derive(Debug, thiserror::Error)]
#[error("watch connection dropped by the fake API server")]
pub(crate) struct WatchAborted;

pub(crate) type WatchChunk = Result<Bytes, WatchAborted>;

pub(crate) enum ResponseBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<WatchChunk>),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = WatchAborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WatchAborted>>> {
        match self.get_mut() {
            ResponseBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseBody::Stream(rx) => rx.poll_recv(cx).map(|c| c.map(|c| c.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ResponseBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
            ResponseBody::Stream(_) => SizeHint::default(),
        }
    }
}
