//! The `tracing` feature: one span per request, entered on the VM thread
//! around its run, so events a Rust callback emits nest under it. Seen by a
//! small hand-written subscriber that records spans and events.
#![cfg(feature = "tracing")]

mod common;

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use common::within;
use mlua_isle::{Isle, IsleError, IslePool};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

#[derive(Debug, Clone)]
struct SpanRec {
    id: u64,
    name: &'static str,
    fields: HashMap<&'static str, String>,
}

#[derive(Debug, Clone)]
struct EventRec {
    message: String,
    /// The span current on the emitting thread.
    parent: Option<u64>,
}

/// Records every span (with its fields, as recorded so far) and event.
#[derive(Default)]
struct Recorder {
    next: AtomicU64,
    spans: Mutex<Vec<SpanRec>>,
    events: Mutex<Vec<EventRec>>,
}

thread_local! {
    static ENTERED: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

struct Fields<'a>(&'a mut HashMap<&'static str, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name(), value.to_string());
    }
}

impl Subscriber for &'static Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut fields = HashMap::new();
        span.record(&mut Fields(&mut fields));
        self.spans.lock().unwrap().push(SpanRec {
            id,
            name: span.metadata().name(),
            fields,
        });
        Id::from_u64(id)
    }
    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut spans = self.spans.lock().unwrap();
        if let Some(s) = spans.iter_mut().find(|s| s.id == span.into_u64()) {
            values.record(&mut Fields(&mut s.fields));
        }
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut fields = HashMap::new();
        event.record(&mut Fields(&mut fields));
        let parent = ENTERED.with(|e| e.borrow().last().copied());
        self.events.lock().unwrap().push(EventRec {
            message: fields.remove("message").unwrap_or_default(),
            parent,
        });
    }
    fn enter(&self, span: &Id) {
        ENTERED.with(|e| e.borrow_mut().push(span.into_u64()));
    }
    fn exit(&self, _: &Id) {
        ENTERED.with(|e| e.borrow_mut().pop());
    }
}

/// The request span whose event said `message`.
fn span_of(rec: &Recorder, message: &str) -> SpanRec {
    let events = rec.events.lock().unwrap();
    let event = events
        .iter()
        .find(|e| e.message == message)
        .unwrap_or_else(|| panic!("no event {message:?}: {events:?}"));
    let parent = event.parent.expect("the event has a current span");
    let spans = rec.spans.lock().unwrap();
    spans.iter().find(|s| s.id == parent).unwrap().clone()
}

/// The recorded spans are the request spans: every field once the run has
/// returned (the worker records them before its caller could see the
/// metrics, but after the caller has its result).
fn finished(rec: &Recorder, id: u64) -> SpanRec {
    let mut span = None;
    common::eventually("the span's outcome is recorded", || {
        let spans = rec.spans.lock().unwrap();
        span = spans
            .iter()
            .find(|s| s.id == id && s.fields.contains_key("outcome"))
            .cloned();
        span.is_some()
    });
    span.unwrap()
}

#[test]
fn each_request_runs_in_a_span_that_callback_events_nest_under() {
    static RECORDER: std::sync::OnceLock<Recorder> = std::sync::OnceLock::new();
    let rec: &'static Recorder = RECORDER.get_or_init(Recorder::default);
    tracing::subscriber::set_global_default(rec).expect("the only subscriber");

    within("request spans", move || {
        let init = |lua: &mlua_isle::mlua::Lua| {
            let say = lua.create_function(|_, msg: String| {
                tracing::info!("{msg}");
                Ok(())
            })?;
            lua.globals().set("say", say)
        };
        let isle = Isle::spawn(init).unwrap();
        isle.eval::<()>("say('isle ok')").unwrap();
        assert!(isle.eval::<()>("say('isle fails'); error('x')").is_err());

        let pool = IslePool::new(2, init).unwrap();
        pool.session("tenant-7")
            .eval::<()>("say('session ok')")
            .unwrap();
        let t = pool.spawn_eval::<()>("say('unkeyed, cancelled'); while true do end");
        common::eventually("the loop's event", || {
            rec.events
                .lock()
                .unwrap()
                .iter()
                .any(|e| e.message == "unkeyed, cancelled")
        });
        t.cancel();
        assert_eq!(t.wait(), Err(IsleError::Cancelled));

        let isle_ok = finished(rec, span_of(rec, "isle ok").id);
        assert_eq!(isle_ok.name, "lua_request");
        assert_eq!(isle_ok.fields["outcome"], "completed");
        assert!(!isle_ok.fields.contains_key("worker"), "{isle_ok:?}");
        assert!(!isle_ok.fields.contains_key("session"), "{isle_ok:?}");
        for f in ["owner", "queue_wait_ns", "run_time_ns"] {
            let v: u64 = isle_ok.fields[f].parse().expect(f);
            assert!(f == "queue_wait_ns" || v > 0, "{f}: {isle_ok:?}");
        }
        let isle_fails = finished(rec, span_of(rec, "isle fails").id);
        assert_eq!(isle_fails.fields["outcome"], "failed");
        assert_eq!(isle_fails.fields["owner"], isle_ok.fields["owner"]);

        let session = finished(rec, span_of(rec, "session ok").id);
        assert_eq!(session.fields["outcome"], "completed");
        assert_eq!(session.fields["session"], "tenant-7");
        assert!(
            ["0", "1"].contains(&session.fields["worker"].as_str()),
            "{session:?}"
        );
        assert_ne!(session.fields["owner"], isle_ok.fields["owner"]);

        let cancelled = finished(rec, span_of(rec, "unkeyed, cancelled").id);
        assert_eq!(cancelled.fields["outcome"], "cancelled");
        assert!(!cancelled.fields.contains_key("session"), "{cancelled:?}");
        assert_eq!(cancelled.fields["owner"], session.fields["owner"]);

        // One span per request: four requests, four spans.
        let spans = rec.spans.lock().unwrap().len();
        assert_eq!(spans, 4, "{:?}", rec.spans.lock().unwrap());
        pool.shutdown().unwrap();
        isle.shutdown().unwrap();
    });
}
