//! Endpoints and the dispatcher: which handler a request reaches, by oslo's rules (see
//! [`Dispatcher`]).

use std::collections::HashMap;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::context::RequestContext;
use crate::version::Version;
use crate::wire::envelope::{ArgsOf, RequestHeader};
use crate::wire::failure::Failure;
use crate::wire::Document;

/// The module oslo's dispatcher errors come from.
const DISPATCHER_MODULE: &str = "oslo_messaging.rpc.dispatcher";

/// A handler's result, ready to be serialized in whatever codec the reply uses.
pub(crate) type HandlerResult = Result<Box<dyn erased_serde::Serialize + Send>, Failure>;

type ErasedHandler = Arc<dyn Fn(&RequestContext, &Document) -> HandlerResult + Send + Sync>;

/// A group of methods served under one namespace and version (an oslo endpoint object).
///
/// Methods are closures registered by name. Arguments arrive as oslo's keyword-argument map
/// and are deserialized into the handler's argument type (a struct with one field per
/// argument, or a map); the result is serialized back to the caller.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use warren::{Endpoint, Failure, RequestContext, Version};
///
/// #[derive(Deserialize)]
/// struct StartArgs { instance_id: String }
///
/// #[derive(Serialize)]
/// struct Started { instance_id: String, state: &'static str }
///
/// let compute = Endpoint::new()
///     .version(Version::new(4, 2))
///     .method("start_instance", |ctx: &RequestContext, args: StartArgs| {
///         let _user = ctx.get_str("user_id");
///         Ok::<_, Failure>(Started { instance_id: args.instance_id, state: "running" })
///     });
/// assert!(compute.has_method("start_instance"));
/// ```
#[derive(Clone)]
pub struct Endpoint {
    namespace: Option<String>,
    legacy_namespaces: Vec<String>,
    version: Version,
    methods: HashMap<String, ErasedHandler>,
}

impl Default for Endpoint {
    fn default() -> Self {
        Endpoint::new()
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut methods: Vec<&String> = self.methods.keys().collect();
        methods.sort();
        f.debug_struct("Endpoint")
            .field("namespace", &self.namespace)
            .field("version", &self.version.as_str())
            .field("methods", &methods)
            .finish()
    }
}

impl Endpoint {
    /// An endpoint in the null namespace, version `1.0`, with no methods.
    pub fn new() -> Endpoint {
        Endpoint {
            namespace: None,
            legacy_namespaces: Vec::new(),
            version: Version::one(),
            methods: HashMap::new(),
        }
    }

    /// Serves requests of this namespace only (requests without one go elsewhere).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Endpoint {
        self.namespace = Some(namespace.into());
        self
    }

    /// Also accepts requests of an older namespace name (oslo's `legacy_namespaces`).
    pub fn legacy_namespace(mut self, namespace: impl Into<String>) -> Endpoint {
        self.legacy_namespaces.push(namespace.into());
        self
    }

    /// The version this endpoint implements (default `1.0`).
    pub fn version(mut self, version: Version) -> Endpoint {
        self.version = version;
        self
    }

    /// Registers `handler` as method `name`, replacing any previous one.
    ///
    /// `A` is the arguments' type (use [`NoArgs`] for none), `R` the result, and `E` anything
    /// that converts into a [`Failure`]. Arguments that do not fit `A` are answered with a
    /// `TypeError` naming the argument; a panic is answered with a `HandlerPanic` failure and
    /// does not take the worker down.
    pub fn method<A, R, E, F>(mut self, name: impl Into<String>, handler: F) -> Endpoint
    where
        A: DeserializeOwned + 'static,
        R: Serialize + Send + 'static,
        E: Into<Failure> + 'static,
        F: Fn(&RequestContext, A) -> Result<R, E> + Send + Sync + 'static,
    {
        let name = name.into();
        let method = name.clone();
        let erased: ErasedHandler = Arc::new(move |ctx: &RequestContext, doc: &Document| {
            let args = doc
                .decode::<ArgsOf<A>>()
                .map_err(|e| bad_arguments(&method, &e.path, &e.message))?
                .0;
            match handler(ctx, args) {
                Ok(result) => Ok(Box::new(result) as Box<dyn erased_serde::Serialize + Send>),
                Err(e) => Err(e.into()),
            }
        });
        self.methods.insert(name, erased);
        self
    }

    /// Whether a method of that name is registered.
    pub fn has_method(&self, name: &str) -> bool {
        self.methods.contains_key(name)
    }

    fn accepts_namespace(&self, namespace: Option<&str>) -> bool {
        self.namespace.as_deref() == namespace
            || namespace.is_some_and(|ns| self.legacy_namespaces.iter().any(|l| l == ns))
    }
}

/// Arguments of a method that takes none: deserializes from any argument map.
///
/// ```
/// use warren::{
///     Endpoint, Failure, NoArgs, RequestContext, RpcClient, RpcServer, Target, Transport,
/// };
///
/// let transport = Transport::new("memory://doc-noargs/")?;
/// let endpoint =
///     Endpoint::new().method("ping", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>("pong"));
/// let server = RpcServer::builder(&transport, Target::new("demo").with_server("demo-1"))
///     .endpoint(endpoint)
///     .build()?;
/// server.start()?;
///
/// let client = RpcClient::new(&transport, Target::new("demo"));
/// let ctx = RequestContext::new();
/// let reply: String = client.call(&ctx, "ping", &NoArgs {})?; // sends `{}`
/// assert_eq!(reply, "pong");
/// // Arguments the method does not take are ignored.
/// let reply: String = client.call(&ctx, "ping", &serde_json::json!({"verbose": true}))?;
/// assert_eq!(reply, "pong");
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NoArgs {}

impl<'de> serde::Deserialize<'de> for NoArgs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(deserializer).map(|_| NoArgs {})
    }
}

/// Which registered methods callers may reach.
///
/// Set on a server with [`RpcServerBuilder::access_policy`](crate::RpcServerBuilder::access_policy).
///
/// ```
/// use warren::{
///     AccessPolicy, Endpoint, Failure, NoArgs, RequestContext, RpcClient, RpcServer, Target,
///     Transport,
/// };
///
/// let transport = Transport::new("memory://doc-access-policy/")?;
/// let endpoint =
///     Endpoint::new().method("_reset", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>(true));
/// let ctx = RequestContext::new();
///
/// // The default policy hides methods whose name starts with `_`.
/// let strict = RpcServer::builder(&transport, Target::new("strict").with_server("s-1"))
///     .endpoint(endpoint.clone())
///     .build()?;
/// strict.start()?;
/// let err = RpcClient::new(&transport, Target::new("strict"))
///     .call::<_, bool>(&ctx, "_reset", &NoArgs {})
///     .unwrap_err();
/// assert!(err.is_remote("NoSuchMethod"));
///
/// // The legacy policy serves every registered method.
/// let legacy = RpcServer::builder(&transport, Target::new("legacy").with_server("l-1"))
///     .endpoint(endpoint)
///     .access_policy(AccessPolicy::Legacy)
///     .build()?;
/// legacy.start()?;
/// let client = RpcClient::new(&transport, Target::new("legacy"));
/// assert!(client.call::<_, bool>(&ctx, "_reset", &NoArgs {})?);
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum AccessPolicy {
    /// oslo's `DefaultRPCAccessPolicy`: methods whose name starts with `_` are private.
    #[default]
    Default,
    /// oslo's `LegacyRPCAccessPolicy`: every registered method.
    Legacy,
}

impl AccessPolicy {
    fn allows(self, method: &str) -> bool {
        match self {
            AccessPolicy::Default => !method.starts_with('_'),
            AccessPolicy::Legacy => true,
        }
    }
}

/// Routes requests to endpoints (oslo's `RPCDispatcher`).
///
/// For each endpoint **in order**: skip it unless the request's namespace is one the endpoint
/// accepts and the endpoint's version can serve the requested one (same major, minor not
/// above). The first compatible endpoint that has the method, and whose name the access policy
/// allows, handles the request. If some endpoint was compatible but none had the method, the
/// caller gets `NoSuchMethod`; if none was compatible, `UnsupportedVersion` (also for a mere
/// namespace mismatch). Both come from module `oslo_messaging.rpc.dispatcher` with oslo's
/// messages, so Python callers see what an oslo server would send.
///
/// An [`RpcServer`](crate::RpcServer) builds its dispatcher from the endpoints and the access
/// policy given to its builder; this shows the routing through one.
///
/// ```
/// use warren::{
///     AccessPolicy, Dispatcher, Endpoint, Failure, NoArgs, RequestContext, RpcClient, RpcServer,
///     Target, Transport, Version,
/// };
///
/// let v1 = Endpoint::new()
///     .version(Version::new(1, 3))
///     .method("ping", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>("v1"));
/// let v2 = Endpoint::new()
///     .version(Version::new(2, 0))
///     .method("ping", |_: &RequestContext, _: NoArgs| Ok::<_, Failure>("v2"));
/// // What the server below routes with:
/// let _dispatcher = Dispatcher::new(vec![v1.clone(), v2.clone()], AccessPolicy::Default);
///
/// let transport = Transport::new("memory://doc-dispatcher/")?;
/// let server = RpcServer::builder(&transport, Target::new("svc").with_server("svc-1"))
///     .endpoint(v1)
///     .endpoint(v2)
///     .build()?;
/// server.start()?;
///
/// let client = RpcClient::new(&transport, Target::new("svc"));
/// let ctx = RequestContext::new();
/// let ping = |version: &str| {
///     client.prepare().version(version).call::<_, String>(&ctx, "ping", &NoArgs {})
/// };
/// assert_eq!(ping("1.2")?, "v1"); // 1.3 serves 1.2
/// assert_eq!(ping("2.0")?, "v2");
/// assert!(ping("2.1").unwrap_err().is_remote("UnsupportedVersion"));
/// // A compatible endpoint without the method:
/// let err = client.call::<_, String>(&ctx, "pong", &NoArgs {}).unwrap_err();
/// assert!(err.is_remote("NoSuchMethod"));
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Dispatcher {
    endpoints: Vec<Endpoint>,
    policy: AccessPolicy,
}

impl Dispatcher {
    /// A dispatcher over `endpoints`, tried in order.
    pub fn new(endpoints: Vec<Endpoint>, policy: AccessPolicy) -> Dispatcher {
        Dispatcher { endpoints, policy }
    }

    /// Whether an endpoint accepting `namespace` has `method` (and callers may reach it),
    /// whatever its version: for observers, which label unknown methods apart.
    pub(crate) fn serves(&self, namespace: Option<&str>, method: &str) -> bool {
        self.policy.allows(method)
            && self
                .endpoints
                .iter()
                .any(|e| e.accepts_namespace(namespace) && e.methods.contains_key(method))
    }

    /// Runs the handler for a request, turning every way it can fail into a [`Failure`].
    pub(crate) fn dispatch(
        &self,
        header: &RequestHeader,
        ctx: &RequestContext,
        doc: &Document,
    ) -> HandlerResult {
        let requested = match header.version.as_deref() {
            None => Version::one(),
            Some(text) => Version::parse(text).map_err(|_| {
                Failure::new(
                    "ValueError",
                    "builtins",
                    format!("invalid RPC version {text:?}"),
                )
            })?,
        };
        let method = header.method.as_str();
        let mut found_compatible = false;
        for endpoint in &self.endpoints {
            if !endpoint.accepts_namespace(header.namespace.as_deref())
                || !endpoint.version.can_serve(&requested)
            {
                continue;
            }
            if let Some(handler) = endpoint
                .methods
                .get(method)
                .filter(|_| self.policy.allows(method))
            {
                return catch_unwind(AssertUnwindSafe(|| handler(ctx, doc))).unwrap_or_else(
                    |panic| {
                        let payload = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "non-string panic payload".into());
                        Err(Failure::new(
                            "HandlerPanic",
                            "warren.server",
                            format!("handler of {method} panicked: {payload}"),
                        ))
                    },
                );
            }
            found_compatible = true;
        }
        Err(if found_compatible {
            Failure::new(
                "NoSuchMethod",
                DISPATCHER_MODULE,
                format!("Endpoint does not support RPC method {method}"),
            )
        } else {
            Failure::new(
                "UnsupportedVersion",
                DISPATCHER_MODULE,
                format!(
                    "Endpoint does not support RPC version {requested}. Attempted method: {method}"
                ),
            )
        })
    }
}

/// A `TypeError` (what Python raises for bad keyword arguments) naming the argument.
fn bad_arguments(method: &str, path: &str, message: &str) -> Failure {
    let detail = match path.strip_prefix("args.") {
        Some(argument) => format!("argument `{argument}`: {message}"),
        None => message.to_string(),
    };
    Failure::new(
        "TypeError",
        "builtins",
        format!("{method}() got bad arguments: {detail}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::envelope::Request;
    use crate::wire::Codec;
    use serde_json::{json, Value};

    fn request(
        codec: Codec,
        method: &str,
        args: Value,
        namespace: Option<&str>,
        version: Option<&str>,
    ) -> (RequestHeader, Document) {
        let ctx = RequestContext::new();
        let body = codec
            .encode(&Request {
                method,
                args: &args,
                namespace,
                version,
                call: None,
                unique_id: "u",
                context: &ctx,
            })
            .unwrap();
        let doc = Document::open(Some(codec.content_type()), body).unwrap();
        (doc.decode().unwrap(), doc)
    }

    fn run(
        d: &Dispatcher,
        method: &str,
        args: Value,
        namespace: Option<&str>,
        version: Option<&str>,
    ) -> Result<Value, Failure> {
        let mut results = Vec::new();
        for codec in [Codec::Json, Codec::MsgPack] {
            let (header, doc) = request(codec, method, args.clone(), namespace, version);
            let result = d
                .dispatch(&header, &RequestContext::new(), &doc)
                .map(|r| serde_json::to_value(&*r).unwrap());
            results.push(result);
        }
        let second = results.pop().unwrap();
        let first = results.pop().unwrap();
        match (&first, &second) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "both codecs dispatch alike"),
            (Err(a), Err(b)) => assert_eq!(a.class(), b.class(), "both codecs fail alike"),
            _ => panic!("codecs disagree: {first:?} vs {second:?}"),
        }
        first
    }

    #[derive(serde::Deserialize)]
    struct Add {
        a: i64,
        b: i64,
    }

    /// The server name `whoami` answers.
    const SERVER: &str = "unit";

    /// The standard endpoints of the tests (`tests/common/mod.rs`, `endpoints()`) as far as
    /// the case table of `tests/fixtures/dispatch-rules.json` reaches them, plus methods that
    /// panic and fail: null namespace 1.3, and namespace `admin` (legacy `old_admin`) 2.1.
    fn dispatcher() -> Dispatcher {
        let v1 = Endpoint::new()
            .version(Version::new(1, 3))
            .method("echo", |_: &RequestContext, args: Value| {
                Ok::<_, Failure>(args)
            })
            .method("whoami", |_: &RequestContext, _: NoArgs| {
                Ok::<_, Failure>(SERVER)
            })
            .method("add", |_: &RequestContext, x: Add| {
                Ok::<_, Failure>(x.a + x.b)
            })
            .method("_private", |_: &RequestContext, _: NoArgs| {
                Ok::<_, Failure>(1)
            })
            .method(
                "boom",
                |_: &RequestContext, _: NoArgs| -> Result<(), Failure> { panic!("kaboom") },
            )
            .method(
                "fail",
                |_: &RequestContext, _: NoArgs| -> Result<(), Failure> {
                    Err(Failure::new("ValueError", "builtins", "bad value"))
                },
            );
        let admin = Endpoint::new()
            .namespace("admin")
            .legacy_namespace("old_admin")
            .version(Version::new(2, 1))
            .method("reset", |_: &RequestContext, _: NoArgs| {
                Ok::<_, Failure>(format!("reset by {SERVER}"))
            });
        Dispatcher::new(vec![v1, admin], AccessPolicy::Default)
    }

    /// oslo's dispatch rules, as the case table of `tests/fixtures/dispatch-rules.json` (shared
    /// with the memory, RabbitMQ and interop tests) lists them: namespaces, versions,
    /// `NoSuchMethod` versus `UnsupportedVersion`, private methods. Results, and failures'
    /// class, module and message, exactly, in both codecs.
    #[test]
    fn no_such_method_versus_unsupported_version() {
        let table: Value =
            serde_json::from_str(include_str!("../tests/fixtures/dispatch-rules.json")).unwrap();
        let cases = table["cases"].as_array().unwrap();
        assert!(!cases.is_empty());
        let d = dispatcher();
        for case in cases {
            let (namespace, version) = (case["namespace"].as_str(), case["version"].as_str());
            let method = case["method"].as_str().unwrap();
            let got = run(&d, method, json!({}), namespace, version);
            let expect = &case["expect"];
            match (got, expect.get("result")) {
                (Ok(value), Some(result)) => {
                    let result = match result {
                        Value::String(text) => json!(text.replace("{server}", SERVER)),
                        other => other.clone(),
                    };
                    assert_eq!(value, result, "{case}");
                }
                (Err(failure), None) => {
                    let module = expect["module"]
                        .as_str()
                        .unwrap_or("oslo_messaging.rpc.dispatcher");
                    assert_eq!(
                        (failure.class(), failure.module(), failure.message()),
                        (
                            expect["error"].as_str().unwrap(),
                            module,
                            expect["message"].as_str().unwrap()
                        ),
                        "{case}"
                    );
                }
                (got, _) => panic!("{case}: got {got:?}"),
            }
        }
    }

    #[test]
    fn private_methods_are_refused_by_default() {
        // As in the case table, and served under the legacy policy.
        let refused = run(&dispatcher(), "_private", json!({}), None, None).unwrap_err();
        assert_eq!(refused.class(), "NoSuchMethod");
        let mut legacy = dispatcher();
        legacy.policy = AccessPolicy::Legacy;
        assert_eq!(
            run(&legacy, "_private", json!({}), None, None).unwrap(),
            json!(1)
        );
    }

    #[test]
    fn bad_arguments_name_the_argument() {
        let d = dispatcher();
        let wrong = run(&d, "add", json!({"a": "two", "b": 3}), None, None).unwrap_err();
        assert_eq!((wrong.class(), wrong.module()), ("TypeError", "builtins"));
        assert!(
            wrong.message().contains("argument `a`"),
            "{}",
            wrong.message()
        );
        let missing = run(&d, "add", json!({"a": 1}), None, None).unwrap_err();
        assert!(
            missing.message().contains("missing field `b`"),
            "{}",
            missing.message()
        );
    }

    #[test]
    fn panics_and_errors_become_failures() {
        let d = dispatcher();
        let panic = run(&d, "boom", json!({}), None, None).unwrap_err();
        assert_eq!(panic.class(), "HandlerPanic");
        assert!(panic.message().contains("kaboom"));
        let failed = run(&d, "fail", json!({}), None, None).unwrap_err();
        assert_eq!(
            (failed.class(), failed.message()),
            ("ValueError", "bad value")
        );
    }

    #[test]
    fn which_methods_a_dispatcher_serves() {
        let d = dispatcher();
        assert!(d.serves(None, "add"));
        assert!(!d.serves(None, "nope"), "an unknown method");
        assert!(!d.serves(None, "_private"), "a private one");
        assert!(!d.serves(None, "reset"), "in another namespace");
        assert!(d.serves(Some("admin"), "reset"));
        assert!(d.serves(Some("old_admin"), "reset"), "a legacy namespace");
        assert!(!d.serves(Some("admin"), "add"));
        let legacy = Dispatcher::new(d.endpoints.clone(), AccessPolicy::Legacy);
        assert!(legacy.serves(None, "_private"));
    }

    #[test]
    fn endpoints_know_their_methods_and_describe_themselves() {
        let d = dispatcher();
        let [v1, admin] = [&d.endpoints[0], &d.endpoints[1]];
        assert!(v1.has_method("add") && v1.has_method("_private"));
        assert!(!v1.has_method("reset") && admin.has_method("reset"));
        assert_eq!(
            format!("{v1:?}"),
            r#"Endpoint { namespace: None, version: "1.3", methods: ["_private", "add", "boom", "echo", "fail", "whoami"] }"#
        );
        assert_eq!(
            format!("{admin:?}"),
            r#"Endpoint { namespace: Some("admin"), version: "2.1", methods: ["reset"] }"#
        );
    }
}
