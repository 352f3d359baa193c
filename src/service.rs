//! Typed services: an RPC API declared once, as a Rust trait, from which [`service!`] makes
//! both the server's [`Endpoint`] and a typed client.
//!
//! An oslo RPC API is a set of methods taking keyword arguments, under a namespace and a
//! version. [`service!`] takes that API written as a trait — each method's parameters are the
//! keyword arguments, by name and type — and generates:
//!
//! - the trait itself, whose methods also take the caller's [`RequestContext`] and return
//!   `Result<T, Failure>`, with a provided `endpoint(self) -> Endpoint` that serves an
//!   implementation (`Compute::endpoint(agent)`);
//! - a client type (named in the declaration) with one method per RPC method, taking typed
//!   arguments, plus `prepare()`-style overrides (`server`, `timeout`, `fanout`, …) and the
//!   modes of [`RpcClient`]: `.call()` (the default: wait for the result), `.cast()` (fire and
//!   forget) and `.start_call()` (a [`PendingCall`] to wait on later).
//!
//! The wire is oslo's unchanged: the method name is the Rust method's name and the arguments
//! travel as oslo's `args` map, keyed by the parameters' names. A typed client can so call a
//! Python oslo.messaging server, and a Python client can call a typed Rust server, with no
//! change on the Python side (tests/interop.rs proves both).
//!
//! Why a `macro_rules!` macro and not a procedural one: it needs no separate proc-macro crate,
//! no `syn`/`quote` in every user's build, and what it generates can be read in one place
//! (this file). The price is a fixed order in the declaration (`namespace`, then `version`,
//! then `client`) and parameter names that must not repeat the client's own methods (`new`,
//! `prepare`, `call`, `cast`, `start_call`, `rpc_client` and the overrides: `server`,
//! `topic`, `exchange`, `fanout`, `version`, `timeout`, `version_cap`, `retry`, `confirm`,
//! `at_least_once`, `call_monitor_timeout`). A clash is a compile error naming the method.
//!
//! How a request's arguments are checked, as Python would: a missing argument is a
//! `TypeError` unless its type is an `Option` (then `None`), an unexpected one is a
//! `TypeError`, and one of the wrong type is a `TypeError` naming it.
//!
//! [`Endpoint`]: crate::Endpoint
//! [`RequestContext`]: crate::RequestContext
//! [`RpcClient`]: crate::RpcClient
//! [`PendingCall`]: crate::PendingCall
//! [`service!`]: crate::service!

use serde::de::DeserializeOwned;

use crate::client::{PendingCall, RpcClient};
use crate::context::RequestContext;
use crate::error::Result;

/// How a typed client sends: [`Call`], [`Cast`] or [`StartCall`], mirroring
/// [`RpcClient::call`], [`RpcClient::cast`] and [`RpcClient::start_call`].
///
/// Sealed: the three modes are all there is. Code generic over the mode names what a method
/// returns as `M::Output<R>`:
///
/// ```
/// use warren::service::Mode;
/// use warren::{Failure, RequestContext, RpcServer, Target, Transport};
///
/// warren::service! {
///     pub trait Clock {
///         client = ClockClient;
///         fn now() -> u64;
///     }
/// }
///
/// struct Fixed;
/// impl Clock for Fixed {
///     fn now(&self, _: &RequestContext) -> Result<u64, Failure> { Ok(42) }
/// }
///
/// /// Asks for the time in whichever mode `clock` is.
/// fn ask<M: Mode>(clock: &ClockClient<M>) -> warren::Result<M::Output<u64>> {
///     clock.now(&RequestContext::new())
/// }
///
/// let transport = Transport::new("memory://doc-service-mode/")?;
/// let server = RpcServer::builder(&transport, Target::new("clock").with_server("clock-1"))
///     .endpoint(Clock::endpoint(Fixed))
///     .build()?;
/// server.start()?;
///
/// let clock = ClockClient::new(&transport, Target::new("clock"));
/// assert_eq!(ask(&clock)?, 42);
/// assert_eq!(ask(&clock.start_call())?.wait()?, 42);
/// # Ok::<(), warren::Error>(())
/// ```
pub trait Mode: sealed::Sealed + Clone + Copy + std::fmt::Debug + Send + Sync + 'static {
    /// What a typed method returns (inside `Result`) for a method whose result is `R`.
    type Output<R>;

    /// Sends `method` with `args` through `client` in this mode.
    #[doc(hidden)]
    fn send<R: DeserializeOwned>(
        client: &RpcClient,
        ctx: &RequestContext,
        method: &str,
        args: &__private::NamedArgs<'_>,
    ) -> Result<Self::Output<R>>;
}

/// The default mode of a typed client: each method waits for its result
/// ([`RpcClient::call`]).
///
/// ```
/// use warren::service::Call;
/// use warren::{Failure, RequestContext, RpcServer, Target, Transport};
///
/// warren::service! {
///     pub trait Greeter {
///         client = GreeterClient;
///         fn greet(name: String) -> String;
///     }
/// }
///
/// struct Polite;
/// impl Greeter for Polite {
///     fn greet(&self, _: &RequestContext, name: String) -> Result<String, Failure> {
///         Ok(format!("hello, {name}"))
///     }
/// }
///
/// let transport = Transport::new("memory://doc-service-call/")?;
/// let server = RpcServer::builder(&transport, Target::new("greeter").with_server("g-1"))
///     .endpoint(Greeter::endpoint(Polite))
///     .build()?;
/// server.start()?;
///
/// let greeter: GreeterClient<Call> = GreeterClient::new(&transport, Target::new("greeter"));
/// assert_eq!(greeter.greet(&RequestContext::new(), "alice")?, "hello, alice");
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Call;

/// Each method sends a cast and returns `()` once the broker has it ([`RpcClient::cast`]);
/// with `fanout(true)`, every server of the topic gets it.
///
/// ```
/// use std::sync::mpsc::{self, Sender};
/// use std::time::Duration;
/// use warren::{Failure, RequestContext, RpcServer, Target, Transport};
///
/// warren::service! {
///     pub trait Cache {
///         client = CacheClient;
///         fn evict(key: String);
///     }
/// }
///
/// struct Evictions(Sender<String>);
/// impl Cache for Evictions {
///     fn evict(&self, _: &RequestContext, key: String) -> Result<(), Failure> {
///         self.0.send(key).map_err(|_| Failure::from("nobody listens"))
///     }
/// }
///
/// let transport = Transport::new("memory://doc-service-cast/")?;
/// let (evicted_tx, evicted) = mpsc::channel();
/// let server = RpcServer::builder(&transport, Target::new("cache").with_server("cache-1"))
///     .endpoint(Cache::endpoint(Evictions(evicted_tx)))
///     .build()?;
/// server.start()?;
///
/// let cache = CacheClient::new(&transport, Target::new("cache"));
/// cache.cast().evict(&RequestContext::new(), "user:42")?; // returns without waiting
/// assert_eq!(evicted.recv_timeout(Duration::from_secs(5)).unwrap(), "user:42");
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cast;

/// Each method sends a call and returns its [`PendingCall`] without waiting
/// ([`RpcClient::start_call`]).
///
/// ```
/// use warren::{Failure, RequestContext, RpcServer, Target, Transport};
///
/// warren::service! {
///     pub trait Squares {
///         client = SquaresClient;
///         fn square(n: u64) -> u64;
///     }
/// }
///
/// struct Math;
/// impl Squares for Math {
///     fn square(&self, _: &RequestContext, n: u64) -> Result<u64, Failure> { Ok(n * n) }
/// }
///
/// let transport = Transport::new("memory://doc-service-start-call/")?;
/// let server = RpcServer::builder(&transport, Target::new("squares").with_server("s-1"))
///     .endpoint(Squares::endpoint(Math))
///     .build()?;
/// server.start()?;
///
/// // Several calls in flight at once, waited for afterwards.
/// let squares = SquaresClient::new(&transport, Target::new("squares")).start_call();
/// let ctx = RequestContext::new();
/// let pending = (1..=3u64).map(|n| squares.square(&ctx, n)).collect::<warren::Result<Vec<_>>>()?;
/// let results = pending.into_iter().map(|p| p.wait()).collect::<warren::Result<Vec<_>>>()?;
/// assert_eq!(results, [1, 4, 9]);
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StartCall;

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Call {}
    impl Sealed for super::Cast {}
    impl Sealed for super::StartCall {}
}

impl Mode for Call {
    type Output<R> = R;

    fn send<R: DeserializeOwned>(
        client: &RpcClient,
        ctx: &RequestContext,
        method: &str,
        args: &__private::NamedArgs<'_>,
    ) -> Result<R> {
        client.call(ctx, method, args)
    }
}

impl Mode for Cast {
    type Output<R> = ();

    fn send<R: DeserializeOwned>(
        client: &RpcClient,
        ctx: &RequestContext,
        method: &str,
        args: &__private::NamedArgs<'_>,
    ) -> Result<()> {
        client.cast(ctx, method, args)
    }
}

impl Mode for StartCall {
    type Output<R> = PendingCall<R>;

    fn send<R: DeserializeOwned>(
        client: &RpcClient,
        ctx: &RequestContext,
        method: &str,
        args: &__private::NamedArgs<'_>,
    ) -> Result<PendingCall<R>> {
        client.start_call(ctx, method, args)
    }
}

/// Declares a typed RPC service: a trait for the server side, an endpoint builder, and a typed
/// client. See the [module documentation](mod@crate::service) for what is generated and why.
///
/// The declaration is a trait whose methods list their keyword arguments (`name: Type`) and
/// result type (none means `()`), preceded by, in this order, an optional `namespace = "…";`,
/// an optional `version = "X.Y";` (default `1.0`; checked at compile time) and the client's
/// type name, `client = Name;`. Doc comments and attributes are kept.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use warren::{Failure, RequestContext, RpcServer, Target, Transport};
///
/// #[derive(Debug, Serialize, Deserialize, PartialEq)]
/// pub struct Instance { id: String, state: String }
///
/// warren::service! {
///     /// The compute agent's RPC API.
///     pub trait Compute {
///         namespace = "compute";
///         version = "4.2";
///         client = ComputeClient;
///
///         /// Starts an instance; `host` may be left out (it is an `Option`).
///         fn start_instance(instance_id: String, host: Option<String>) -> Instance;
///         /// Forgets cached state; usually cast.
///         fn refresh_cache();
///     }
/// }
///
/// struct Agent;
///
/// impl Compute for Agent {
///     fn start_instance(&self, _ctx: &RequestContext, instance_id: String, host: Option<String>)
///         -> Result<Instance, Failure>
///     {
///         let state = format!("running on {}", host.as_deref().unwrap_or("any host"));
///         Ok(Instance { id: instance_id, state })
///     }
///
///     fn refresh_cache(&self, _ctx: &RequestContext) -> Result<(), Failure> {
///         Ok(())
///     }
/// }
///
/// let transport = Transport::new("memory://service-doc/")?;
/// let server = RpcServer::builder(&transport, Target::new("compute").with_server("host-1"))
///     .endpoint(Compute::endpoint(Agent))
///     .build()?;
/// server.start()?;
///
/// let compute = ComputeClient::new(&transport, Target::new("compute"));
/// let ctx = RequestContext::new().with("user_id", "alice");
/// let vm = compute.start_instance(&ctx, "vm-1", None)?;
/// assert_eq!(vm, Instance { id: "vm-1".into(), state: "running on any host".into() });
///
/// // prepare()-style overrides, and the cast and start_call modes:
/// let on_host = compute.prepare().server("host-1").timeout(std::time::Duration::from_secs(5));
/// let pending = on_host.start_call().start_instance(&ctx, "vm-2", Some("host-1".to_string()))?;
/// on_host.cast().refresh_cache(&ctx)?;
/// assert_eq!(pending.wait()?.state, "running on host-1");
///
/// server.stop();
/// server.wait();
/// # Ok::<(), warren::Error>(())
/// ```
#[macro_export]
macro_rules! service {
    (
        $(#[$attr:meta])*
        $vis:vis trait $name:ident {
            $(namespace = $namespace:literal;)?
            $(version = $version:literal;)?
            client = $client:ident;
            $(
                $(#[$method_attr:meta])*
                fn $method:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)?;
            )*
        }
    ) => {
        $(const _: () = $crate::service::__private::assert_version($version);)?

        $(#[$attr])*
        $vis trait $name: ::core::marker::Send + ::core::marker::Sync + 'static {
            $(
                $(#[$method_attr])*
                fn $method(
                    &self,
                    ctx: &$crate::RequestContext
                    $(, $arg: $ty)*
                ) -> ::core::result::Result<$crate::__service_result!($($ret)?), $crate::Failure>;
            )*

            #[doc = concat!(
                "The endpoint serving this implementation of `", stringify!($name),
                "` (its namespace and version), to give to `RpcServerBuilder::endpoint`."
            )]
            fn endpoint(self) -> $crate::Endpoint
            where
                Self: ::core::marker::Sized,
            {
                let this = ::std::sync::Arc::new(self);
                let endpoint = $crate::service::__private::endpoint(
                    $crate::__service_option!($($namespace)?),
                    $crate::__service_option!($($version)?),
                );
                $(
                    let endpoint = {
                        $crate::__service_arguments!(Arguments { $($arg: $ty),* });
                        let this = ::std::sync::Arc::clone(&this);
                        endpoint.method(
                            stringify!($method),
                            move |ctx: &$crate::RequestContext, _arguments: Arguments| {
                                this.$method(ctx $(, _arguments.$arg)*)
                            },
                        )
                    };
                )*
                let _ = this;
                endpoint
            }
        }

        #[doc = concat!(
            "A typed client of [`", stringify!($name), "`]: one method per RPC method, in the ",
            "mode `M` ([`Call`](", stringify!($crate), "::service::Call) by default; ",
            "`.cast()` and `.start_call()` switch it)."
        )]
        #[derive(Debug, Clone)]
        $vis struct $client<M = $crate::service::Call> {
            rpc: $crate::RpcClient,
            mode: ::core::marker::PhantomData<fn() -> M>,
        }

        impl $client<$crate::service::Call> {
            /// The namespace the service is declared in.
            pub const NAMESPACE: ::core::option::Option<&'static str> =
                $crate::__service_option!($($namespace)?);

            /// A client sending to `target` through `transport`, with the service's namespace
            /// and version unless `target` names its own.
            pub fn new(transport: &$crate::Transport, target: $crate::Target) -> Self {
                let target = $crate::service::__private::typed_target(
                    target,
                    Self::NAMESPACE,
                    $crate::__service_option!($($version)?),
                );
                $client {
                    rpc: $crate::RpcClient::new(transport, target),
                    mode: ::core::marker::PhantomData,
                }
            }
        }

        impl<M: $crate::service::Mode> $client<M> {
            $crate::__service_client_common!($client);

            $(
                $(#[$method_attr])*
                pub fn $method(
                    &self,
                    ctx: &$crate::RequestContext
                    $(, $arg: impl ::core::convert::Into<$ty>)*
                ) -> $crate::Result<<M as $crate::service::Mode>::Output<$crate::__service_result!($($ret)?)>> {
                    $(let $arg: $ty = ::core::convert::Into::into($arg);)*
                    <M as $crate::service::Mode>::send(
                        &self.rpc,
                        ctx,
                        stringify!($method),
                        &$crate::service::__private::NamedArgs(&[
                            $((stringify!($arg), &$arg as &dyn $crate::service::__private::ErasedSerialize)),*
                        ]),
                    )
                }
            )*
        }
    };
}

/// A declared literal as `Some`, or `None`.
#[doc(hidden)]
#[macro_export]
macro_rules! __service_option {
    () => {
        ::core::option::Option::<&'static str>::None
    };
    ($value:literal) => {
        ::core::option::Option::<&'static str>::Some($value)
    };
}

/// A method's result type: the declared one, or `()`.
#[doc(hidden)]
#[macro_export]
macro_rules! __service_result {
    () => {
        ()
    };
    ($ret:ty) => {
        $ret
    };
}

/// The keyword arguments of one method, as a struct deserialized the way Python binds
/// keyword arguments (missing `Option`s are `None`, unknown names are refused).
#[doc(hidden)]
#[macro_export]
macro_rules! __service_arguments {
    ($arguments:ident { $($arg:ident : $ty:ty),* }) => {
        struct $arguments { $($arg: $ty,)* }

        impl<'de> $crate::service::__private::serde::Deserialize<'de> for $arguments {
            fn deserialize<D>(deserializer: D) -> ::core::result::Result<Self, D::Error>
            where
                D: $crate::service::__private::serde::Deserializer<'de>,
            {
                struct Visitor;

                impl<'de> $crate::service::__private::serde::de::Visitor<'de> for Visitor {
                    type Value = $arguments;

                    fn expecting(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                        f.write_str("a map of keyword arguments")
                    }

                    fn visit_map<A>(self, mut _map: A) -> ::core::result::Result<$arguments, A::Error>
                    where
                        A: $crate::service::__private::serde::de::MapAccess<'de>,
                    {
                        $(let mut $arg: ::core::option::Option<$ty> = ::core::option::Option::None;)*
                        while let ::core::option::Option::Some(_name) = _map.next_key_seed(
                            $crate::service::__private::ArgumentName(&[$(stringify!($arg)),*]),
                        )? {
                            $(
                                if _name == stringify!($arg) {
                                    $arg = ::core::option::Option::Some(_map.next_value()?);
                                    continue;
                                }
                            )*
                            // Unreachable: ArgumentName accepts the declared names only.
                            _map.next_value::<$crate::service::__private::serde::de::IgnoredAny>()?;
                        }
                        ::core::result::Result::Ok($arguments {
                            $($arg: match $arg {
                                ::core::option::Option::Some(value) => value,
                                ::core::option::Option::None => {
                                    $crate::service::__private::missing_argument(stringify!($arg))?
                                }
                            },)*
                        })
                    }
                }

                deserializer.deserialize_map(Visitor)
            }
        }
    };
}

/// The methods every typed client has: `prepare()`, the mode switches and the overrides of
/// [`RpcClient`](crate::RpcClient).
#[doc(hidden)]
#[macro_export]
macro_rules! __service_client_common {
    ($client:ident) => {
        /// A copy to override options on (oslo's `prepare()`); the original is unchanged.
        pub fn prepare(&self) -> Self {
            ::core::clone::Clone::clone(self)
        }

        /// The untyped client underneath, with the same target and options.
        pub fn rpc_client(&self) -> &$crate::RpcClient {
            &self.rpc
        }

        /// This client in the mode that waits for each result (the default).
        pub fn call(&self) -> $client<$crate::service::Call> {
            $client { rpc: self.rpc.clone(), mode: ::core::marker::PhantomData }
        }

        /// This client in the mode that casts: each method returns once the broker has it.
        pub fn cast(&self) -> $client<$crate::service::Cast> {
            $client { rpc: self.rpc.clone(), mode: ::core::marker::PhantomData }
        }

        /// This client in the mode that starts calls: each method returns a `PendingCall`.
        pub fn start_call(&self) -> $client<$crate::service::StartCall> {
            $client { rpc: self.rpc.clone(), mode: ::core::marker::PhantomData }
        }

        $crate::__service_client_common!(@override $client
            /// Sends to one server (`<topic>.<server>`) only.
            server(server: impl ::core::convert::Into<::std::string::String>);
            /// Overrides the topic.
            topic(topic: impl ::core::convert::Into<::std::string::String>);
            /// Overrides the exchange.
            exchange(exchange: impl ::core::convert::Into<::std::string::String>);
            /// Casts to every server of the topic (with `.cast()`).
            fanout(fanout: bool);
            /// Asks for this version (`"X.Y"`) instead of the service's.
            version(version: impl ::core::convert::Into<::std::string::String>);
            /// How long a call waits for its reply (and a send for the broker).
            timeout(timeout: ::std::time::Duration);
            /// Refuses to send versions this cap cannot serve (oslo's `version_cap`).
            version_cap(cap: impl ::core::convert::Into<::std::string::String>);
            /// How many more passes over the broker hosts before giving up (oslo's `retry`).
            retry(retry: u32);
            /// Whether a send waits for the broker's publisher confirm (default `true`).
            confirm(confirm: bool);
            /// Publishes as `mandatory`: a message no queue can take fails at once.
            at_least_once(at_least_once: bool);
            /// oslo's call monitoring: keep-alives from the server while the method runs.
            call_monitor_timeout(monitor: ::std::time::Duration);
        );
    };
    (@override $client:ident $(
        $(#[$doc:meta])*
        $setter:ident($value:ident : $ty:ty);
    )*) => {
        $(
            $(#[$doc])*
            #[doc = concat!("\n\nSee `RpcClient::", stringify!($setter), "`.")]
            pub fn $setter(self, $value: $ty) -> Self {
                $client { rpc: self.rpc.$setter($value), mode: ::core::marker::PhantomData }
            }
        )*
    };
}

/// What [`service!`](crate::service!)'s expansion uses; not a public API.
#[doc(hidden)]
pub mod __private {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{self, DeserializeSeed, Deserializer, Visitor};
    use serde::ser::{SerializeMap, Serializer};

    pub use erased_serde::Serialize as ErasedSerialize;
    pub use serde;

    use crate::dispatcher::Endpoint;
    use crate::target::Target;
    use crate::version::Version;

    /// A call's keyword arguments, serialized as oslo's `args` map in declaration order.
    pub struct NamedArgs<'a>(pub &'a [(&'static str, &'a dyn ErasedSerialize)]);

    impl serde::Serialize for NamedArgs<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut map = serializer.serialize_map(Some(self.0.len()))?;
            for (name, value) in self.0 {
                map.serialize_entry(name, value)?;
            }
            map.end()
        }
    }

    /// Reads a keyword argument's name, accepting only the declared ones (Python's
    /// "got an unexpected keyword argument").
    pub struct ArgumentName(pub &'static [&'static str]);

    impl<'de> DeserializeSeed<'de> for ArgumentName {
        type Value = &'static str;

        fn deserialize<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_str(self)
        }
    }

    impl Visitor<'_> for ArgumentName {
        type Value = &'static str;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a keyword argument's name")
        }

        fn visit_str<E: de::Error>(self, name: &str) -> Result<&'static str, E> {
            self.0
                .iter()
                .find(|known| **known == name)
                .copied()
                .ok_or_else(|| {
                    E::custom(format_args!(
                        "unexpected keyword argument {}",
                        crate::wire::limits::preview(name)
                    ))
                })
        }

        fn visit_bytes<E: de::Error>(self, name: &[u8]) -> Result<&'static str, E> {
            match std::str::from_utf8(name) {
                Ok(name) => self.visit_str(name),
                Err(_) => Err(E::custom("a keyword argument's name is not UTF-8")),
            }
        }
    }

    /// The value of an argument the request left out: `None` for an `Option`, else a
    /// `TypeError` naming it (Python's "missing 1 required positional argument").
    pub fn missing_argument<'de, T: serde::Deserialize<'de>, E: de::Error>(
        name: &'static str,
    ) -> Result<T, E> {
        T::deserialize(Missing {
            name,
            error: PhantomData,
        })
    }

    /// A deserializer for an absent value: `None` to an `Option`, an error to anything else.
    struct Missing<E> {
        name: &'static str,
        error: PhantomData<E>,
    }

    impl<'de, E: de::Error> Deserializer<'de> for Missing<E> {
        type Error = E;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, E> {
            Err(E::custom(format_args!(
                "missing required argument '{}'",
                self.name
            )))
        }

        fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, E> {
            visitor.visit_none()
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf unit unit_struct newtype_struct seq tuple
            tuple_struct map struct enum identifier ignored_any
        }
    }

    /// The endpoint of a service: its namespace and version, no methods yet.
    pub fn endpoint(namespace: Option<&'static str>, version: Option<&'static str>) -> Endpoint {
        let mut endpoint = Endpoint::new();
        if let Some(namespace) = namespace {
            endpoint = endpoint.namespace(namespace);
        }
        if let Some(version) = version {
            // `assert_version` checked this literal when the service was compiled, and it
            // accepts exactly what `Version::parse` does; the fallback cannot be taken.
            endpoint = endpoint.version(Version::parse(version).unwrap_or_else(|_| Version::one()));
        }
        endpoint
    }

    /// `target` with the service's namespace and version where it names none.
    pub fn typed_target(
        mut target: Target,
        namespace: Option<&'static str>,
        version: Option<&'static str>,
    ) -> Target {
        if target.namespace.is_none() {
            target.namespace = namespace.map(str::to_string);
        }
        if target.version.is_none() {
            target.version = version.map(str::to_string);
        }
        target
    }

    /// Fails the build unless `version` is `X.Y` or `X.Y.Z` (what `Version::parse` accepts).
    pub const fn assert_version(version: &str) {
        let bytes = version.as_bytes();
        let mut parts = 1;
        let mut digits = 0;
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                // At most 19 digits: every such number fits `Version`'s u64.
                b'0'..=b'9' if digits < 19 => digits += 1,
                b'.' if digits > 0 => {
                    parts += 1;
                    digits = 0;
                }
                _ => panic!("a service's version must be \"X.Y\" or \"X.Y.Z\""),
            }
            i += 1;
        }
        if digits == 0 || parts < 2 || parts > 3 {
            panic!("a service's version must be \"X.Y\" or \"X.Y.Z\"");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::__private::assert_version;
    use crate::version::Version;

    #[test]
    fn the_compile_time_version_check_agrees_with_parse() {
        for good in ["1.0", "4.2", "10.20.3", "9999999999999999999.0"] {
            assert_version(good);
            assert!(Version::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1",
            "1.",
            ".1",
            "a.b",
            "1.2.3.4",
            "1..2",
            "-1.0",
            "1.99999999999999999999",
        ] {
            let caught = std::panic::catch_unwind(|| assert_version(bad));
            assert!(caught.is_err(), "{bad:?} accepted");
            assert!(Version::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn argument_names_are_read_from_strings_or_bytes_only() {
        use super::__private::ArgumentName;
        use serde::de::value::{BytesDeserializer, Error as ValueError, StrDeserializer};
        use serde::de::DeserializeSeed;

        let names = ArgumentName(&["instance_id", "host"]);
        let from_bytes = |bytes: &[u8]| {
            ArgumentName(names.0).deserialize(BytesDeserializer::<ValueError>::new(bytes))
        };
        assert_eq!(from_bytes(b"host"), Ok("host"));
        assert!(from_bytes(b"flavor").is_err());
        assert!(from_bytes(&[0xff, 0xfe]).is_err(), "not UTF-8");
        let from_str =
            ArgumentName(names.0).deserialize(StrDeserializer::<ValueError>::new("instance_id"));
        assert_eq!(from_str, Ok("instance_id"));
        let not_a_name = ArgumentName(names.0)
            .deserialize(serde_json::json!(5))
            .unwrap_err()
            .to_string();
        assert!(
            not_a_name.contains("a keyword argument's name"),
            "{not_a_name}"
        );
    }
}
