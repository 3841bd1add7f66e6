//! Admission weighted by bytes: a server layer that bounds the request bytes held by all calls at once.
//!
//! A concurrency limit alone does not bound memory: tonic buffers a whole request message (up to
//! `grpc.max_message_bytes`) before any handler runs, so 256 admitted calls of 96 MiB would be 24 GiB. Here every
//! request body's bytes are taken from one budget as they arrive, before they are buffered; a frame that does not
//! fit fails the call with RESOURCE_EXHAUSTED (naming the limit) and its bytes are never held. A call's bytes
//! return to the budget when its response ends (the last message of a stream, an error, or the caller going
//! away): the request message, its images and what is derived from them live about that long.
//!
//! The same budget serves an HTTP API beside the gRPC one: [`Charge`], [`ChargedBody`] and [`HeldBody::new`] let
//! an HTTP middleware charge its request bodies (up front when `Content-Length` says how much, else as they arrive)
//! and hold the charge until its response ends.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::codegen::Bytes;

/// The shared budget of request bytes.
#[derive(Debug)]
pub struct ByteBudget {
    max: u64,
    key: &'static str,
    used: AtomicU64,
    rejected: AtomicU64,
}

impl ByteBudget {
    /// A budget of `max` bytes; `key` is the config key refusals name (e.g. `limits.max_inflight_bytes`).
    pub fn new(max: u64, key: &'static str) -> Arc<Self> {
        Arc::new(Self {
            max,
            key,
            used: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        })
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The bound.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Calls refused for want of bytes since start.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    fn try_take(&self, bytes: u64) -> Result<(), OverBudget> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.saturating_add(bytes);
            if next > self.max {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(OverBudget(format!(
                    "server overloaded: {used} request bytes in flight, {bytes} more would exceed `{}` ({}); \
                     retry later",
                    self.key, self.max
                )));
            }
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(now) => used = now,
            }
        }
    }
}

/// A request that does not fit the budget: the message names the limit (RESOURCE_EXHAUSTED, HTTP 429).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OverBudget(pub String);

/// What one call holds of the budget; returned when the last holder (request body, response body) drops.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<ByteBudget>,
    bytes: AtomicU64,
}

impl Charge {
    /// A call's charge, holding nothing yet.
    pub fn new(budget: &Arc<ByteBudget>) -> Arc<Self> {
        Arc::new(Self {
            budget: Arc::clone(budget),
            bytes: AtomicU64::new(0),
        })
    }

    /// Takes `bytes` more for this call, or refuses them (nothing taken).
    pub fn take(&self, bytes: u64) -> Result<(), OverBudget> {
        self.budget.try_take(bytes)?;
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        Ok(())
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        let bytes = *self.bytes.get_mut();
        self.budget.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// The layer (`Server::builder().layer(ByteBudgetLayer::new(budget))`); without a budget it passes calls
/// through untouched (one response type either way, so a server's type does not depend on its config).
#[derive(Debug, Clone)]
pub struct ByteBudgetLayer {
    budget: Option<Arc<ByteBudget>>,
}

impl ByteBudgetLayer {
    /// Charges every call's request bytes to `budget`, if any.
    pub fn new(budget: Option<Arc<ByteBudget>>) -> Self {
        Self { budget }
    }
}

impl<S> tower::Layer<S> for ByteBudgetLayer {
    type Service = ByteBudgetService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ByteBudgetService {
            inner,
            budget: self.budget.clone(),
        }
    }
}

/// See [`ByteBudgetLayer`].
#[derive(Debug, Clone)]
pub struct ByteBudgetService<S> {
    inner: S,
    budget: Option<Arc<ByteBudget>>,
}

impl<S, ResBody> tower::Service<http::Request<tonic::body::Body>> for ByteBudgetService<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<HeldBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let charge = self.budget.as_ref().map(Charge::new);
        let request = match &charge {
            Some(charge) => request.map(|body| {
                tonic::body::Body::new(CountedBody {
                    inner: body,
                    charge: Some(Arc::clone(charge)),
                })
            }),
            None => request,
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| HeldBody {
                inner,
                _charge: charge,
            }))
        })
    }
}

pin_project! {
    /// A request body whose bytes are taken from the budget as they arrive.
    struct CountedBody {
        #[pin]
        inner: tonic::body::Body,
        charge: Option<Arc<Charge>>,
    }
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.project();
        let frame = match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let (Some(data), Some(charge)) = (frame.data_ref(), this.charge.as_ref())
            && let Err(over) = charge.take(data.len() as u64)
        {
            // Nothing more is read of this body; what it holds returns when the call ends.
            *this.charge = None;
            return Poll::Ready(Some(Err(tonic::Status::resource_exhausted(over.0))));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// Any request body (an HTTP API's) whose bytes past the first `prepaid` (taken up front from a
    /// `Content-Length`) are taken from the budget as they arrive; a frame that does not fit ends the body with
    /// [`OverBudget`], which a reader finds in its error's source chain.
    pub struct ChargedBody<B> {
        #[pin]
        inner: B,
        charge: Option<Arc<Charge>>,
        prepaid: u64,
    }
}

impl<B> ChargedBody<B> {
    /// `inner` charged to `charge`, its first `prepaid` bytes already taken.
    pub fn new(inner: B, charge: Arc<Charge>, prepaid: u64) -> Self {
        Self {
            inner,
            charge: Some(charge),
            prepaid,
        }
    }
}

impl<B> Body for ChargedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<crate::service::BoxError>,
{
    type Data = Bytes;
    type Error = crate::service::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, crate::service::BoxError>>> {
        let this = self.project();
        let frame = match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let (Some(data), Some(charge)) = (frame.data_ref(), this.charge.as_ref()) {
            let length = data.len() as u64;
            let prepaid = length.min(*this.prepaid);
            *this.prepaid -= prepaid;
            if let Err(over) = charge.take(length - prepaid) {
                *this.charge = None;
                return Poll::Ready(Some(Err(Box::new(over))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// A response body that holds its call's charge until it is dropped.
    pub struct HeldBody<B> {
        #[pin]
        inner: B,
        _charge: Option<Arc<Charge>>,
    }
}

impl<B> HeldBody<B> {
    /// `inner`, holding `charge` until it drops.
    pub fn new(inner: B, charge: Arc<Charge>) -> Self {
        Self {
            inner,
            _charge: Some(charge),
        }
    }
}

impl<B: Body> Body for HeldBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of the given frames.
    struct Frames(std::collections::VecDeque<Bytes>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|data| Ok(Frame::data(data))))
        }
    }

    fn frames(sizes: &[usize]) -> Frames {
        Frames(
            sizes
                .iter()
                .map(|size| Bytes::from(vec![0u8; *size]))
                .collect(),
        )
    }

    /// Reads `body` to its end or its first error; the bytes read.
    fn read(body: ChargedBody<Frames>) -> Result<usize, crate::service::BoxError> {
        let mut body = std::pin::pin!(body);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut read = 0;
        loop {
            match body.as_mut().poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => read += frame.data_ref().map_or(0, Bytes::len),
                Poll::Ready(Some(Err(err))) => return Err(err),
                Poll::Ready(None) => return Ok(read),
                Poll::Pending => unreachable!("the frames are all there"),
            }
        }
    }

    #[test]
    fn a_charged_body_takes_what_was_not_prepaid_and_stops_at_the_bound() {
        let budget = ByteBudget::new(100, "limits.max_inflight_bytes");
        // 30 bytes prepaid (a Content-Length), 50 arrive: 20 more are taken as they come.
        let charge = Charge::new(&budget);
        charge.take(30).expect("fits");
        assert_eq!(
            read(ChargedBody::new(frames(&[25, 25]), Arc::clone(&charge), 30)).ok(),
            Some(50)
        );
        assert_eq!(budget.used(), 50);
        // Another call's body over what is left fails with the limit in its error, and takes nothing more.
        let other = Charge::new(&budget);
        let err = read(ChargedBody::new(frames(&[40, 40]), Arc::clone(&other), 0))
            .expect_err("over the bound");
        let over = err.downcast_ref::<OverBudget>().expect("an OverBudget");
        assert!(over.0.contains("limits.max_inflight_bytes"), "{over}");
        assert_eq!(budget.used(), 90);
        // Every charge returns its bytes when its holders drop.
        drop(other);
        drop(charge);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn takes_fit_until_the_bound_and_a_charge_returns_its_bytes() {
        let budget = ByteBudget::new(100, "limits.max_inflight_bytes");
        let charge = Charge {
            budget: Arc::clone(&budget),
            bytes: AtomicU64::new(0),
        };
        budget.try_take(60).expect("fits");
        charge.bytes.fetch_add(60, Ordering::Relaxed);
        let err = budget.try_take(41).expect_err("over");
        assert!(err.0.contains("limits.max_inflight_bytes"), "{}", err.0);
        assert_eq!(budget.rejected(), 1);
        budget.try_take(40).expect("exactly fits");
        budget.used.fetch_sub(40, Ordering::Relaxed);
        drop(charge);
        assert_eq!(budget.used(), 0);
    }
}
