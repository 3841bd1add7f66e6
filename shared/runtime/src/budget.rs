//! Admission weighted by bytes: a server layer that bounds the request bytes held by all calls at once.
//!
//! A concurrency limit alone does not bound memory: tonic buffers a whole request message (up to
//! `grpc.max_message_bytes`) before any handler runs, so 256 admitted calls of 96 MiB would be 24 GiB. Here every
//! request body's bytes are taken from one budget as they arrive, before they are buffered; a frame that does not
//! fit fails the call with RESOURCE_EXHAUSTED (naming the limit) and its bytes are never held. A call's bytes
//! return to the budget when its response ends (the last message of a stream, an error, or the caller going
//! away): the request message, its images and what is derived from them live about that long.

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

    fn try_take(&self, bytes: u64) -> Result<(), tonic::Status> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let next = used.saturating_add(bytes);
            if next > self.max {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(tonic::Status::resource_exhausted(format!(
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

/// What one call holds of the budget; returned when the last holder (request body, response body) drops.
#[derive(Debug)]
struct Charge {
    budget: Arc<ByteBudget>,
    bytes: AtomicU64,
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
        let charge = self.budget.as_ref().map(|budget| {
            Arc::new(Charge {
                budget: Arc::clone(budget),
                bytes: AtomicU64::new(0),
            })
        });
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
        if let (Some(data), Some(charge)) = (frame.data_ref(), this.charge.as_ref()) {
            let bytes = data.len() as u64;
            if let Err(status) = charge.budget.try_take(bytes) {
                // Nothing more is read of this body; what it holds returns when the call ends.
                *this.charge = None;
                return Poll::Ready(Some(Err(status)));
            }
            charge.bytes.fetch_add(bytes, Ordering::AcqRel);
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
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(
            err.message().contains("limits.max_inflight_bytes"),
            "{}",
            err.message()
        );
        assert_eq!(budget.rejected(), 1);
        budget.try_take(40).expect("exactly fits");
        budget.used.fetch_sub(40, Ordering::Relaxed);
        drop(charge);
        assert_eq!(budget.used(), 0);
    }
}
