//! The page and its data over HTTP: `/` (the page, its script and style embedded in the
//! binary: control rooms are often offline), `/api/cameras` (JSON) and `/events` (the same
//! JSON as server-sent events, on every change and every few seconds).

use crate::board::View;
use crate::link::Shared;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

const INDEX: &str = include_str!("../assets/index.html");
const SCRIPT: &str = include_str!("../assets/app.js");
const STYLE: &str = include_str!("../assets/style.css");

/// How often a live stream is refreshed when nothing changed (the ages on the page).
const REFRESH: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    streams: Arc<Semaphore>,
    shutdown: CancellationToken,
}

pub fn router(shared: Arc<Shared>, max_streams: usize, shutdown: CancellationToken) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/style.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route("/api/cameras", get(cameras))
        .route("/events", get(events))
        .with_state(AppState {
            shared,
            streams: Arc::new(Semaphore::new(max_streams)),
            shutdown,
        })
}

/// An embedded file. The policy allows only the page's own script and style: whatever came
/// over MQTT is written with `textContent`, and even a mistake there could not run inline
/// script.
fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'",
                ),
            ),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

fn view(shared: &Shared) -> Option<View> {
    let mut v = shared
        .board
        .lock()
        .ok()?
        .view(fhecam_proto::ids::unix_now_ms());
    v.broker_connected = shared.broker_connected.load(Ordering::Relaxed);
    Some(v)
}

async fn cameras(State(s): State<AppState>) -> Response {
    match view(&s.shared) {
        Some(v) => Json(v).into_response(),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// One live stream's state between events.
struct Stream {
    state: AppState,
    changes: tokio::sync::watch::Receiver<u64>,
    _permit: OwnedSemaphorePermit,
    first: bool,
}

async fn events(State(s): State<AppState>) -> Response {
    let Ok(permit) = s.streams.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many live streams (limits.max_streams); close another cockpit tab",
        )
            .into_response();
    };
    let st = Stream {
        changes: s.shared.version.subscribe(),
        state: s,
        _permit: permit,
        first: true,
    };
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        if !st.first {
            tokio::select! {
                _ = st.state.shutdown.cancelled() => return None,
                r = st.changes.changed() => r.ok()?,
                _ = tokio::time::sleep(REFRESH) => {}
            }
            // many messages in a burst make one event
            tokio::time::sleep(Duration::from_millis(200)).await;
            st.changes.borrow_and_update();
        }
        st.first = false;
        let json = serde_json::to_string(&view(&st.state.shared)?).ok()?;
        Some((Ok::<_, Infallible>(Event::default().data(json)), st))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
