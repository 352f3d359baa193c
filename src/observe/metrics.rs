//! [`MetricsObserver`]: records what clients, servers and connections do through the
//! [`metrics`](https://docs.rs/metrics) facade (cargo feature `metrics`), for whichever
//! exporter the application installs (Prometheus, StatsD, OpenTelemetry...).
//!
//! Names and attributes follow OpenTelemetry's semantic conventions for RPC where they apply
//! (`rpc.server.duration` and `rpc.client.duration` in seconds, `rpc.system`, `rpc.service`,
//! `rpc.method`, `error.type`, `messaging.system`, `server.address`); what they do not cover
//! is under `rpc.oslo_messaging.*` (their pattern for system-specific attributes) and
//! `warren.*`.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `rpc.server.duration` | histogram, seconds: from the start of handling to the reply sent | base, kind, `error.type` if it failed |
//! | `rpc.server.active_requests` | gauge: requests being handled | base, kind |
//! | `rpc.server.calls` | counter: calls handled | base |
//! | `rpc.server.casts` | counter: casts handled | base |
//! | `rpc.server.failures` | counter: requests whose method failed (or was refused) | base, kind, `error.type`, `rpc.oslo_messaging.expected` (`true` / `false`) |
//! | `rpc.client.duration` | histogram, seconds: a call until its result, a cast until sent | base, kind, `error.type` if it failed |
//! | `rpc.client.calls` | counter: calls made | base |
//! | `rpc.client.casts` | counter: casts sent (or attempted) | base |
//! | `rpc.client.failures` | counter: calls and casts that failed, timeouts included | base, kind, `error.type` |
//! | `rpc.client.timeouts` | counter: calls that timed out | base, kind |
//! | `warren.connections` | gauge: open RabbitMQ connections | `messaging.system`, `warren.connection.role` |
//! | `warren.connection.losses` | counter: connections lost | `messaging.system`, `warren.connection.role`, `server.address` |
//! | `warren.connection.reconnects` | counter: connections re-established after a loss | `messaging.system`, `warren.connection.role`, `server.address` |
//!
//! Labels:
//! - base: `rpc.system` = `oslo_messaging`; `rpc.service` = the namespace, or else the topic;
//!   `rpc.method` = the method (`_OTHER` on a server for a method it does not have, so
//!   callers cannot create series at will).
//! - kind: `rpc.oslo_messaging.kind` = `call` or `cast`.
//! - `error.type`: the failure's exception class (`ValueError`, `NoSuchMethod`...),
//!   `timeout`, or the kind of the error (`connection`, `delivery_failure`... see
//!   [`error_type`](super::error_type)).
//! - `messaging.system` = `rabbitmq`; `warren.connection.role` = `send`, `reply` or `listen`;
//!   `server.address` = the broker's `host:port`.
//!
//! ```
//! use std::sync::Arc;
//! use warren::observe::MetricsObserver;
//! use warren::Transport;
//!
//! // Install the exporter's recorder first (e.g. metrics-exporter-prometheus), then:
//! let transport = Transport::builder("memory://metrics-doc/")
//!     .observer(Arc::new(MetricsObserver::new()))
//!     .build()?;
//! # let _ = transport;
//! # Ok::<(), warren::Error>(())
//! ```

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Label, Unit,
};

use super::{ClientRequest, ConnectionState, Event, Observer, Outcome, RequestKind, ServerRequest};

/// An [`Observer`] recording through the `metrics` facade; the metrics and their labels are
/// listed in the [module documentation](self).
///
/// An application installs its exporter's recorder (`metrics::set_global_recorder`, or the
/// exporter's own `install()`) before creating the observer. Here a recorder of this thread
/// only counts the calls a client makes:
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::sync::Arc;
/// use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
/// use warren::observe::MetricsObserver;
/// use warren::{Endpoint, Failure, NoArgs, RequestContext, RpcClient, RpcServer, Target, Transport};
///
/// /// Counts `rpc.client.calls`; drops everything else.
/// #[derive(Default)]
/// struct ClientCalls(Arc<AtomicU64>);
///
/// impl Recorder for ClientCalls {
///     fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
///     fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
///     fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
///     fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
///         match key.name() {
///             "rpc.client.calls" => Counter::from_arc(self.0.clone()),
///             _ => Counter::noop(),
///         }
///     }
///     fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
///         Gauge::noop()
///     }
///     fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
///         Histogram::noop()
///     }
/// }
///
/// let recorder = ClientCalls::default();
/// let transport = Transport::builder("memory://doc-metrics-observer/")
///     .observer(Arc::new(MetricsObserver::new()))
///     .build()?;
/// let server = RpcServer::builder(&transport, Target::new("t").with_server("s"))
///     .endpoint(Endpoint::new().method("ping", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>(())))
///     .build()?;
/// server.start()?;
/// let client = RpcClient::new(&transport, Target::new("t"));
/// // A client's call is recorded on the caller's thread: this one.
/// metrics::with_local_recorder(&recorder, || {
///     client.call::<_, ()>(&RequestContext::new(), "ping", &())
/// })?;
/// assert_eq!(recorder.0.load(Ordering::Relaxed), 1);
/// # server.stop();
/// # server.wait();
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Default, Clone, Copy)]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub struct MetricsObserver {
    _private: (),
}

impl MetricsObserver {
    /// An observer recording to the `metrics` crate's current recorder. It describes its
    /// metrics (unit and help text) to the global recorder now: create it after installing
    /// the recorder for the descriptions to reach it.
    pub fn new() -> MetricsObserver {
        describe();
        MetricsObserver { _private: () }
    }
}

/// Units and help texts of every metric.
fn describe() {
    describe_histogram!(
        "rpc.server.duration",
        Unit::Seconds,
        "Time a server took to handle a request: from the start of handling to the reply sent."
    );
    describe_gauge!(
        "rpc.server.active_requests",
        Unit::Count,
        "Requests being handled by servers now."
    );
    describe_counter!("rpc.server.calls", Unit::Count, "Calls handled by servers.");
    describe_counter!("rpc.server.casts", Unit::Count, "Casts handled by servers.");
    describe_counter!(
        "rpc.server.failures",
        Unit::Count,
        "Requests whose method failed or was refused, by failure class."
    );
    describe_histogram!(
        "rpc.client.duration",
        Unit::Seconds,
        "Time a call took until its result, or a cast until it was sent."
    );
    describe_counter!("rpc.client.calls", Unit::Count, "Calls made.");
    describe_counter!("rpc.client.casts", Unit::Count, "Casts sent or attempted.");
    describe_counter!(
        "rpc.client.failures",
        Unit::Count,
        "Calls and casts that failed, by error type (timeouts included)."
    );
    describe_counter!("rpc.client.timeouts", Unit::Count, "Calls that timed out.");
    describe_gauge!(
        "warren.connections",
        Unit::Count,
        "Open RabbitMQ connections, by role."
    );
    describe_counter!(
        "warren.connection.losses",
        Unit::Count,
        "RabbitMQ connections lost, by role."
    );
    describe_counter!(
        "warren.connection.reconnects",
        Unit::Count,
        "RabbitMQ connections re-established after a loss, by role."
    );
}

const SYSTEM: Label = Label::from_static_parts("rpc.system", "oslo_messaging");

fn base(service: &str, method: &str) -> Vec<Label> {
    let mut labels = Vec::with_capacity(6);
    labels.push(SYSTEM);
    labels.push(Label::new("rpc.service", service.to_owned()));
    labels.push(Label::new("rpc.method", method.to_owned()));
    labels
}

fn with_kind(mut labels: Vec<Label>, kind: RequestKind) -> Vec<Label> {
    labels.push(Label::from_static_parts(
        "rpc.oslo_messaging.kind",
        kind.as_str(),
    ));
    labels
}

fn with_error(mut labels: Vec<Label>, error_type: &str) -> Vec<Label> {
    labels.push(Label::new("error.type", error_type.to_owned()));
    labels
}

impl MetricsObserver {
    fn server_started(&self, request: &ServerRequest<'_>) {
        let labels = with_kind(
            base(request.service(), request.method_label()),
            request.kind,
        );
        gauge!("rpc.server.active_requests", labels.iter()).increment(1.0);
    }

    fn server_finished(&self, request: &ServerRequest<'_>, outcome: &Outcome<'_>, seconds: f64) {
        let base = base(request.service(), request.method_label());
        match request.kind {
            RequestKind::Call => counter!("rpc.server.calls", base.iter()).increment(1),
            RequestKind::Cast => counter!("rpc.server.casts", base.iter()).increment(1),
        }
        let labels = with_kind(base, request.kind);
        gauge!("rpc.server.active_requests", labels.iter()).decrement(1.0);
        match outcome.error_type() {
            None => histogram!("rpc.server.duration", labels.iter()).record(seconds),
            Some(error_type) => {
                let labels = with_error(labels, error_type);
                histogram!("rpc.server.duration", labels.iter()).record(seconds);
                let expected = matches!(outcome, Outcome::Failed { expected: true, .. });
                let mut labels = labels;
                labels.push(Label::from_static_parts(
                    "rpc.oslo_messaging.expected",
                    if expected { "true" } else { "false" },
                ));
                counter!("rpc.server.failures", labels.iter()).increment(1);
            }
        }
    }

    fn client_finished(
        &self,
        request: &ClientRequest<'_>,
        kind: RequestKind,
        outcome: &Outcome<'_>,
        seconds: f64,
    ) {
        let base = base(request.service(), request.method);
        match kind {
            RequestKind::Call => counter!("rpc.client.calls", base.iter()).increment(1),
            RequestKind::Cast => counter!("rpc.client.casts", base.iter()).increment(1),
        }
        let labels = with_kind(base, kind);
        if matches!(outcome, Outcome::Timeout) {
            counter!("rpc.client.timeouts", labels.iter()).increment(1);
        }
        match outcome.error_type() {
            None => histogram!("rpc.client.duration", labels.iter()).record(seconds),
            Some(error_type) => {
                let labels = with_error(labels, error_type);
                histogram!("rpc.client.duration", labels.iter()).record(seconds);
                counter!("rpc.client.failures", labels.iter()).increment(1);
            }
        }
    }
}

impl Observer for MetricsObserver {
    fn observe(&self, event: &Event<'_>) {
        match event {
            Event::RequestStarted { request } => self.server_started(request),
            Event::RequestFinished {
                request,
                outcome,
                duration,
            } => self.server_finished(request, outcome, duration.as_secs_f64()),
            Event::CallFinished {
                call,
                outcome,
                duration,
            } => self.client_finished(call, RequestKind::Call, outcome, duration.as_secs_f64()),
            Event::CastSent {
                cast,
                outcome,
                duration,
            } => self.client_finished(cast, RequestKind::Cast, outcome, duration.as_secs_f64()),
            Event::Connection {
                role,
                state,
                address,
            } => {
                let labels = [
                    Label::from_static_parts("messaging.system", "rabbitmq"),
                    Label::from_static_parts("warren.connection.role", role.as_str()),
                ];
                let gauge = gauge!("warren.connections", labels.iter());
                let with_address = || {
                    let mut labels = labels.to_vec();
                    labels.push(Label::new("server.address", (*address).to_owned()));
                    labels
                };
                match state {
                    ConnectionState::Connected => gauge.increment(1.0),
                    ConnectionState::Reconnected => {
                        gauge.increment(1.0);
                        counter!("warren.connection.reconnects", with_address()).increment(1);
                    }
                    ConnectionState::Lost => {
                        gauge.decrement(1.0);
                        counter!("warren.connection.losses", with_address()).increment(1);
                    }
                    ConnectionState::Closed => gauge.decrement(1.0),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! A tiny recorder that keeps every value by name and labels, used through
    //! `metrics::with_local_recorder` (this thread only).

    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use metrics::{
        Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata,
        Recorder, SharedString,
    };
    use parking_lot::Mutex;

    use super::*;
    use crate::observe::ConnectionRole;

    /// One metric's values: a counter's total, a gauge's value, a histogram's samples.
    #[derive(Default)]
    struct Values {
        total: AtomicU64,
        gauge: Mutex<f64>,
        samples: Mutex<Vec<f64>>,
    }

    impl CounterFn for Values {
        fn increment(&self, value: u64) {
            self.total.fetch_add(value, Ordering::Relaxed);
        }
        fn absolute(&self, value: u64) {
            self.total.store(value, Ordering::Relaxed);
        }
    }

    impl GaugeFn for Values {
        fn increment(&self, value: f64) {
            *self.gauge.lock() += value;
        }
        fn decrement(&self, value: f64) {
            *self.gauge.lock() -= value;
        }
        fn set(&self, value: f64) {
            *self.gauge.lock() = value;
        }
    }

    impl HistogramFn for Values {
        fn record(&self, value: f64) {
            self.samples.lock().push(value);
        }
    }

    /// Metrics by `name{label=value,...}` (labels sorted).
    #[derive(Default)]
    struct TestRecorder {
        metrics: Mutex<BTreeMap<String, Arc<Values>>>,
        described: Mutex<Vec<String>>,
    }

    impl TestRecorder {
        fn values(&self, key: &Key) -> Arc<Values> {
            let mut labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let id = format!("{}{{{}}}", key.name(), labels.join(","));
            self.metrics.lock().entry(id).or_default().clone()
        }

        /// The metric `name{labels}`, labels comma-separated in any order.
        fn get(&self, name_and_labels: &str) -> Arc<Values> {
            let (name, labels) = name_and_labels
                .trim_end_matches('}')
                .split_once('{')
                .expect("name{labels}");
            let mut labels: Vec<&str> = labels.split(',').collect();
            labels.sort_unstable();
            let id = format!("{name}{{{}}}", labels.join(","));
            let id = id.as_str();
            let metrics = self.metrics.lock();
            match metrics.get(id) {
                Some(values) => values.clone(),
                None => panic!(
                    "no {id} among:\n{}",
                    metrics.keys().cloned().collect::<Vec<_>>().join("\n")
                ),
            }
        }
    }

    impl Recorder for TestRecorder {
        fn describe_counter(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
            self.described.lock().push(key.as_str().to_owned());
        }
        fn describe_gauge(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
            self.described.lock().push(key.as_str().to_owned());
        }
        fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, _: SharedString) {
            assert_eq!(unit, Some(Unit::Seconds), "{key:?}");
            self.described.lock().push(key.as_str().to_owned());
        }
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            Counter::from_arc(self.values(key))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::from_arc(self.values(key))
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::from_arc(self.values(key))
        }
    }

    const SERVER: &str = "rpc.method=start,rpc.service=compute,rpc.system=oslo_messaging";

    fn request(method: &str, known: bool) -> ServerRequest<'_> {
        ServerRequest {
            topic: "compute",
            namespace: None,
            method,
            kind: RequestKind::Call,
            known,
        }
    }

    #[test]
    fn records_server_requests() {
        let recorder = TestRecorder::default();
        metrics::with_local_recorder(&recorder, || {
            let observer = MetricsObserver::new();
            let start = request("start", true);
            observer.observe(&Event::RequestStarted { request: start });
            observer.observe(&Event::RequestStarted { request: start });
            observer.observe(&Event::RequestFinished {
                request: start,
                outcome: Outcome::Ok,
                duration: Duration::from_millis(250),
            });
            observer.observe(&Event::RequestFinished {
                request: start,
                outcome: Outcome::Failed {
                    class: "InstanceNotFound",
                    expected: true,
                },
                duration: Duration::from_millis(500),
            });
            let unknown = request("made-up", false);
            observer.observe(&Event::RequestStarted { request: unknown });
            observer.observe(&Event::RequestFinished {
                request: unknown,
                outcome: Outcome::Failed {
                    class: "NoSuchMethod",
                    expected: false,
                },
                duration: Duration::from_millis(1),
            });
        });
        assert!(recorder
            .described
            .lock()
            .contains(&"rpc.server.duration".to_string()));
        let kinded = format!("{SERVER},rpc.oslo_messaging.kind=call");
        let ok = recorder.get(&format!("rpc.server.duration{{{kinded}}}"));
        assert_eq!(*ok.samples.lock(), [0.25]);
        let failed = recorder.get(&format!(
            "rpc.server.duration{{error.type=InstanceNotFound,{kinded}}}"
        ));
        assert_eq!(*failed.samples.lock(), [0.5]);
        let calls = recorder.get(&format!("rpc.server.calls{{{SERVER}}}"));
        assert_eq!(calls.total.load(Ordering::Relaxed), 2);
        let failures = recorder.get(
            "rpc.server.failures{error.type=InstanceNotFound,rpc.method=start,rpc.oslo_messaging.expected=true,rpc.oslo_messaging.kind=call,rpc.service=compute,rpc.system=oslo_messaging}",
        );
        assert_eq!(failures.total.load(Ordering::Relaxed), 1);
        let active = recorder.get(&format!("rpc.server.active_requests{{{kinded}}}"));
        assert_eq!(*active.gauge.lock(), 0.0);
        // The unknown method is labelled _OTHER, never with the name the caller chose.
        let other = recorder.get(
            "rpc.server.calls{rpc.method=_OTHER,rpc.service=compute,rpc.system=oslo_messaging}",
        );
        assert_eq!(other.total.load(Ordering::Relaxed), 1);
        assert!(!recorder
            .metrics
            .lock()
            .keys()
            .any(|k| k.contains("made-up")));
    }

    #[test]
    fn records_client_calls_casts_and_timeouts() {
        let recorder = TestRecorder::default();
        metrics::with_local_recorder(&recorder, || {
            let observer = MetricsObserver::new();
            let call = ClientRequest {
                topic: "compute",
                server: Some("host-1"),
                namespace: Some("ns"),
                method: "ping",
                fanout: false,
            };
            for outcome in [Outcome::Ok, Outcome::Ok, Outcome::Timeout] {
                observer.observe(&Event::CallFinished {
                    call,
                    outcome,
                    duration: Duration::from_secs(2),
                });
            }
            let closed = crate::Error::Closed;
            observer.observe(&Event::CastSent {
                cast: call,
                outcome: Outcome::Error(&closed),
                duration: Duration::from_millis(1),
            });
        });
        let base = "rpc.method=ping,rpc.service=ns,rpc.system=oslo_messaging";
        let calls = recorder.get(&format!("rpc.client.calls{{{base}}}"));
        assert_eq!(calls.total.load(Ordering::Relaxed), 3);
        let casts = recorder.get(&format!("rpc.client.casts{{{base}}}"));
        assert_eq!(casts.total.load(Ordering::Relaxed), 1);
        let kinded = format!("{base},rpc.oslo_messaging.kind=call");
        let timeouts = recorder.get(&format!("rpc.client.timeouts{{{kinded}}}"));
        assert_eq!(timeouts.total.load(Ordering::Relaxed), 1);
        let ok = recorder.get(&format!("rpc.client.duration{{{kinded}}}"));
        assert_eq!(*ok.samples.lock(), [2.0, 2.0]);
        let failed = recorder.get(&format!(
            "rpc.client.failures{{error.type=timeout,{kinded}}}"
        ));
        assert_eq!(failed.total.load(Ordering::Relaxed), 1);
        let cast_failed = recorder.get(&format!(
            "rpc.client.failures{{error.type=closed,{base},rpc.oslo_messaging.kind=cast}}"
        ));
        assert_eq!(cast_failed.total.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn records_connections() {
        let recorder = TestRecorder::default();
        metrics::with_local_recorder(&recorder, || {
            let observer = MetricsObserver::new();
            for state in [
                ConnectionState::Connected,
                ConnectionState::Lost,
                ConnectionState::Reconnected,
                ConnectionState::Lost,
                ConnectionState::Reconnected,
            ] {
                observer.observe(&Event::Connection {
                    role: ConnectionRole::Listen,
                    state,
                    address: "127.0.0.1:5672",
                });
            }
        });
        let role = "messaging.system=rabbitmq,warren.connection.role=listen";
        let open = recorder.get(&format!("warren.connections{{{role}}}"));
        assert_eq!(*open.gauge.lock(), 1.0);
        let reconnects = recorder.get(&format!(
            "warren.connection.reconnects{{{role},server.address=127.0.0.1:5672}}"
        ));
        assert_eq!(reconnects.total.load(Ordering::Relaxed), 2);
        let losses = recorder.get(&format!(
            "warren.connection.losses{{{role},server.address=127.0.0.1:5672}}"
        ));
        assert_eq!(losses.total.load(Ordering::Relaxed), 2);
    }
}
