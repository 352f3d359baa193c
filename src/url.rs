//! Transport URLs, parsed exactly as oslo.messaging parses them.
//!
//! `driver://[user:pass@]host:port[,[userN:passN@]hostN:portN]/virtual_host?option=value`
//!
//! * hosts are split on `,`; credentials are split at the last `@`, then at the first `:`;
//!   user name and password are percent-decoded (not `+`-decoded);
//! * the virtual host is the percent-decoded path without its leading `/`
//!   (`rabbit://h/` and `rabbit://h` mean the default vhost `/`, `my%2Fvhost` is `my/vhost`);
//! * query options are `&`-separated `key=value` pairs, `+`-and-percent-decoded; a repeated key
//!   has its values joined with `,`. They are validated by [`TransportOptions`](crate::TransportOptions).
//!
//! Passwords never appear in `Display` or `Debug` output: `rabbit://user:***@h1:5672/`.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The default AMQP port.
pub const DEFAULT_PORT: u16 = 5672;

/// Which driver a URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scheme {
    /// `rabbit://`, `amqp://` or `kombu://`: RabbitMQ over AMQP 0.9.1.
    Rabbit,
    /// `memory://` or `fake://`: the in-process transport (no broker), for unit tests.
    Memory,
}

/// One broker host of a URL, with its credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Host {
    /// Host name or IP address (IPv6 without brackets). Defaults to `localhost`.
    pub hostname: String,
    /// TCP port (default 5672).
    pub port: u16,
    /// User name; empty means "guest", as kombu does.
    pub username: String,
    password: String,
}

impl Host {
    /// The password, for opening a connection. Never log it.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// `host:port` (IPv6 in brackets), safe to log.
    pub fn address(&self) -> String {
        if self.hostname.contains(':') {
            format!("[{}]:{}", self.hostname, self.port)
        } else {
            format!("{}:{}", self.hostname, self.port)
        }
    }

    /// The user name to log in with (`guest` when the URL gives none).
    pub fn login_username(&self) -> &str {
        if self.username.is_empty() {
            "guest"
        } else {
            &self.username
        }
    }

    /// The password to log in with (`guest` when the URL gives no user).
    pub fn login_password(&self) -> &str {
        if self.username.is_empty() && self.password.is_empty() {
            "guest"
        } else {
            &self.password
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.username.is_empty(), self.password.is_empty()) {
            (true, true) => {}
            (_, true) => write!(f, "{}@", self.username)?,
            (_, false) => write!(f, "{}:***@", self.username)?,
        }
        f.write_str(&self.address())
    }
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Host({self})")
    }
}

/// A parsed transport URL.
///
/// ```
/// use warren::TransportUrl;
///
/// let url: TransportUrl = "rabbit://nova:s%40cret@h1:5672,nova:s%40cret@h2:5673/my%2Fvhost?amqp_durable_queues=true"
///     .parse()?;
/// assert_eq!(url.hosts().len(), 2);
/// assert_eq!(url.hosts()[0].password(), "s@cret");
/// assert_eq!(url.virtual_host(), "my/vhost");
/// assert_eq!(url.to_string(), "rabbit://nova:***@h1:5672,nova:***@h2:5673/my%2Fvhost?amqp_durable_queues=true");
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct TransportUrl {
    scheme: Scheme,
    scheme_text: String,
    hosts: Vec<Host>,
    virtual_host: Option<String>,
    query: Vec<(String, String)>,
}

impl TransportUrl {
    /// Parses a URL. See the [module documentation](self) for the rules.
    pub fn parse(input: &str) -> Result<TransportUrl> {
        let input = input.trim();
        let bad = |reason: &str| Error::InvalidUrl {
            url: redact_raw(input),
            reason: reason.to_string(),
        };
        let (scheme_text, rest) = input
            .split_once("://")
            .ok_or_else(|| bad("no scheme (expected e.g. rabbit:// or memory://)"))?;
        let scheme = match scheme_text.split('+').next().unwrap_or_default() {
            "rabbit" | "amqp" | "kombu" => Scheme::Rabbit,
            "memory" | "fake" => Scheme::Memory,
            "amqps" => return Err(bad("TLS (amqps://) is not supported")),
            "" => return Err(bad("no scheme (expected e.g. rabbit:// or memory://)")),
            _ => {
                return Err(bad(
                    "unknown scheme (expected rabbit, amqp, kombu, memory or fake)",
                ))
            }
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let (before_query, query_text) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (netloc, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], Some(&before_query[i..])),
            None => (before_query, None),
        };

        let mut hosts = Vec::new();
        for part in netloc.split(',').filter(|p| !p.is_empty()) {
            hosts.push(parse_host(part).map_err(|r| bad(&r))?);
        }
        let virtual_host = match path {
            Some(p) => Some(percent_decode(&p[1..], false).map_err(|r| bad(&r))?),
            None => None,
        };
        let query = match query_text {
            Some(q) => parse_query(q).map_err(|r| bad(&r))?,
            None => Vec::new(),
        };
        Ok(TransportUrl {
            scheme,
            scheme_text: scheme_text.to_string(),
            hosts,
            virtual_host,
            query,
        })
    }

    /// The driver this URL selects.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The hosts in URL order. A URL without hosts means `localhost:5672` as guest.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Hosts to connect to: the URL's, or `localhost:5672` (guest/guest) if it names none.
    pub fn effective_hosts(&self) -> Vec<Host> {
        if self.hosts.is_empty() {
            vec![Host {
                hostname: "localhost".into(),
                port: DEFAULT_PORT,
                username: String::new(),
                password: String::new(),
            }]
        } else {
            self.hosts.clone()
        }
    }

    /// The virtual host; `/` when the URL has none or an empty one.
    pub fn virtual_host(&self) -> &str {
        match self.virtual_host.as_deref() {
            None | Some("") => "/",
            Some(v) => v,
        }
    }

    /// Query options as `(key, value)` pairs, repeated keys joined with `,`.
    pub fn query(&self) -> &[(String, String)] {
        &self.query
    }

    /// The identity of an in-process broker (`memory://name/vhost` → `name/vhost`).
    pub(crate) fn memory_key(&self) -> String {
        let hosts: Vec<String> = self.hosts.iter().map(|h| h.address()).collect();
        format!("{}/{}", hosts.join(","), self.virtual_host())
    }
}

impl FromStr for TransportUrl {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        TransportUrl::parse(s)
    }
}

impl fmt::Display for TransportUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme_text)?;
        for (i, host) in self.hosts.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{host}")?;
        }
        if let Some(vhost) = &self.virtual_host {
            write!(f, "/{}", vhost.replace('%', "%25").replace('/', "%2F"))?;
        }
        for (i, (k, v)) in self.query.iter().enumerate() {
            write!(f, "{}{k}={v}", if i == 0 { '?' } else { '&' })?;
        }
        Ok(())
    }
}

impl fmt::Debug for TransportUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TransportUrl({self})")
    }
}

fn parse_host(part: &str) -> std::result::Result<Host, String> {
    let (creds, hostport) = match part.rsplit_once('@') {
        Some((c, h)) => (Some(c), h),
        None => (None, part),
    };
    let (username, password) = match creds {
        Some(c) => match c.split_once(':') {
            Some((u, p)) => (percent_decode(u, false)?, percent_decode(p, false)?),
            None => (percent_decode(c, false)?, String::new()),
        },
        None => (String::new(), String::new()),
    };
    let (hostname, port_text) = if let Some(v6) = hostport.strip_prefix('[') {
        let end = v6.find(']').ok_or("invalid IPv6 address (missing `]`)")?;
        let port = v6[end + 1..].strip_prefix(':');
        (v6[..end].to_string(), port)
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    let port = match port_text {
        None | Some("") => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("invalid port {p:?} for host {hostname:?}"))?,
    };
    Ok(Host {
        hostname: if hostname.is_empty() {
            "localhost".into()
        } else {
            hostname
        },
        port,
        username,
        password,
    })
}

fn parse_query(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("option `{pair}` has no value"))?;
        let key = percent_decode(k, true)?;
        let value = percent_decode(v, true)?;
        if value.is_empty() {
            return Err(format!("option `{key}` has an empty value"));
        }
        match out.iter_mut().find(|(existing, _)| *existing == key) {
            Some((_, joined)) => {
                joined.push(',');
                joined.push_str(&value);
            }
            None => out.push((key, value)),
        }
    }
    Ok(out)
}

/// Percent-decodes `text` (and `+` as space when `plus` is set), requiring valid UTF-8.
fn percent_decode(text: &str, plus: bool) -> std::result::Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or("invalid percent-encoding")?;
                out.push(hex);
                i += 3;
            }
            b'+' if plus => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "percent-encoding does not decode to UTF-8".to_string())
}

/// Best-effort redaction of a URL that failed to parse: hides everything between the first
/// `:` after `://` and the last `@` of each host.
fn redact_raw(input: &str) -> String {
    let Some((scheme, rest)) = input.split_once("://") else {
        return if input.contains('@') {
            "<unparseable URL>".into()
        } else {
            input.to_string()
        };
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (netloc, tail) = rest.split_at(end);
    let hosts: Vec<String> = netloc
        .split(',')
        .map(|h| match h.rsplit_once('@') {
            Some((creds, hostport)) => match creds.split_once(':') {
                Some((user, _)) => format!("{user}:***@{hostport}"),
                None => format!("{creds}@{hostport}"),
            },
            None => h.to_string(),
        })
        .collect();
    format!("{scheme}://{}{tail}", hosts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_host_with_credentials_and_vhost() {
        let url =
            TransportUrl::parse("rabbit://u1:p%3Aw@h1:5672,u2:p2@h2:5673/my%2Fvhost").unwrap();
        assert_eq!(url.scheme(), Scheme::Rabbit);
        let hosts = url.hosts();
        assert_eq!(hosts.len(), 2);
        assert_eq!(
            (
                hosts[0].hostname.as_str(),
                hosts[0].port,
                hosts[0].username.as_str()
            ),
            ("h1", 5672, "u1")
        );
        assert_eq!(hosts[0].password(), "p:w");
        assert_eq!((hosts[1].hostname.as_str(), hosts[1].port), ("h2", 5673));
        assert_eq!(url.virtual_host(), "my/vhost");
    }

    #[test]
    fn credentials_split_at_last_at_and_first_colon() {
        let url = TransportUrl::parse("amqp://us@er:pa:ss@host/").unwrap();
        let h = &url.hosts()[0];
        assert_eq!(h.username, "us@er");
        assert_eq!(h.password(), "pa:ss");
        assert_eq!(h.hostname, "host");
        assert_eq!(h.port, 5672);
    }

    #[test]
    fn plus_in_password_is_kept_like_oslo() {
        let url = TransportUrl::parse("rabbit://u:a+b@h/").unwrap();
        assert_eq!(url.hosts()[0].password(), "a+b");
    }

    #[test]
    fn virtual_host_variants() {
        assert_eq!(
            TransportUrl::parse("rabbit://h").unwrap().virtual_host(),
            "/"
        );
        assert_eq!(
            TransportUrl::parse("rabbit://h/").unwrap().virtual_host(),
            "/"
        );
        assert_eq!(
            TransportUrl::parse("rabbit://h//").unwrap().virtual_host(),
            "/"
        );
        assert_eq!(
            TransportUrl::parse("rabbit://h/nova")
                .unwrap()
                .virtual_host(),
            "nova"
        );
    }

    #[test]
    fn ipv6_hosts() {
        let url = TransportUrl::parse("rabbit://u:p@[::1]:5673,[fe80::2]/").unwrap();
        assert_eq!(url.hosts()[0].hostname, "::1");
        assert_eq!(url.hosts()[0].port, 5673);
        assert_eq!(url.hosts()[0].address(), "[::1]:5673");
        assert_eq!(url.hosts()[1].port, 5672);
        assert!(TransportUrl::parse("rabbit://[::1/").is_err());
    }

    #[test]
    fn empty_url_means_localhost_guest() {
        let url = TransportUrl::parse("rabbit://").unwrap();
        assert!(url.hosts().is_empty());
        let hosts = url.effective_hosts();
        assert_eq!(hosts[0].address(), "localhost:5672");
        assert_eq!(hosts[0].login_username(), "guest");
        assert_eq!(hosts[0].login_password(), "guest");
    }

    #[test]
    fn query_repeated_keys_are_joined() {
        let url = TransportUrl::parse("rabbit://h/?a=1&b=x+y&a=2").unwrap();
        assert_eq!(
            url.query(),
            &[
                ("a".to_string(), "1,2".to_string()),
                ("b".to_string(), "x y".to_string())
            ]
        );
    }

    #[test]
    fn bad_urls_are_errors_without_passwords() {
        for bad in [
            "rabbit://u:secret@h:notaport/",
            "http://u:secret@h/",
            "u:secret@h",
            "rabbit://u:secret@h/%zz",
            "rabbit://u:secret@h/?novalue",
            "amqps://u:secret@h/",
        ] {
            let err = TransportUrl::parse(bad).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, Error::InvalidUrl { .. }), "{bad}: {err:?}");
            assert!(!text.contains("secret"), "{text}");
            assert!(!format!("{err:?}").contains("secret"));
        }
    }

    #[test]
    fn display_and_debug_hide_passwords() {
        let url = TransportUrl::parse("rabbit://user:hunter2@h1:5672/").unwrap();
        assert_eq!(url.to_string(), "rabbit://user:***@h1:5672/");
        let debug = format!("{url:?} {:?}", url.hosts());
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("user:***@h1:5672"), "{debug}");
    }

    #[test]
    fn memory_scheme() {
        let url = TransportUrl::parse("memory://unit-test/").unwrap();
        assert_eq!(url.scheme(), Scheme::Memory);
        assert_eq!(url.memory_key(), "unit-test:5672//");
        assert_eq!(
            TransportUrl::parse("fake://").unwrap().scheme(),
            Scheme::Memory
        );
    }
}
