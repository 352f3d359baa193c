//! Transport URLs, parsed exactly as oslo.messaging parses them: see [`TransportUrl`].

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The default AMQP port.
pub const DEFAULT_PORT: u16 = 5672;
/// The default AMQP-over-TLS port (`amqps://`).
pub const DEFAULT_TLS_PORT: u16 = 5671;

/// Which driver a URL selects.
///
/// ```
/// use warren::{Scheme, Transport, TransportUrl};
///
/// assert_eq!("kombu://rabbit1:5672/".parse::<TransportUrl>()?.scheme(), Scheme::Rabbit);
/// assert_eq!("amqps://rabbit1/".parse::<TransportUrl>()?.scheme(), Scheme::Rabbit);
///
/// let transport = Transport::new("memory://doc-scheme/")?;
/// assert_eq!(transport.url().scheme(), Scheme::Memory);
/// # Ok::<(), warren::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scheme {
    /// `rabbit://`, `amqp://` or `kombu://`: RabbitMQ over AMQP 0.9.1.
    Rabbit,
    /// `memory://` or `fake://`: the in-process transport (no broker), for unit tests.
    Memory,
}

/// One broker host of a URL, with its credentials.
///
/// ```
/// use warren::TransportUrl;
///
/// let url: TransportUrl = "rabbit://nova:s3cret@rabbit1:5673,[::1]/".parse()?;
/// let first = &url.hosts()[0];
/// assert_eq!((first.hostname.as_str(), first.port), ("rabbit1", 5673));
/// assert_eq!(first.username, "nova");
/// assert_eq!(first.password(), "s3cret");
/// assert_eq!(first.to_string(), "nova:***@rabbit1:5673"); // `Display` and `Debug` hide it
///
/// let second = &url.hosts()[1];
/// assert_eq!(second.address(), "[::1]:5672");
/// assert_eq!((second.login_username(), second.login_password()), ("guest", "guest"));
/// # Ok::<(), warren::Error>(())
/// ```
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

/// A transport URL, parsed exactly as oslo.messaging parses it.
///
/// `driver://[user:pass@]host:port[,[userN:passN@]hostN:portN]/virtual_host?option=value`
///
/// `rabbit://`, `amqp://` and `kombu://` select RabbitMQ (port 5672 by default), `amqps://`
/// RabbitMQ over TLS (port 5671 by default; the same as `ssl=true`), `memory://` and `fake://`
/// the in-process transport.
///
/// * hosts are split on `,`; credentials are split at the last `@`, then at the first `:`;
///   user name and password are percent-decoded (not `+`-decoded);
/// * the virtual host is the percent-decoded path without its leading `/`
///   (`rabbit://h/` and `rabbit://h` mean the default vhost `/`, `my%2Fvhost` is `my/vhost`);
/// * query options are `&`-separated `key=value` pairs, `+`-and-percent-decoded; a repeated key
///   has its values joined with `,`. They are validated by
///   [`TransportOptions`](crate::TransportOptions).
///
/// Passwords never appear in `Display` or `Debug` output: `rabbit://user:***@h1:5672/`.
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
    /// Parses a URL. See [`TransportUrl`] for the rules.
    ///
    /// An error never shows the password, nor anything that might be part of it: the URL in
    /// it is redacted and its reason names positions ("host 2"), not text.
    pub fn parse(input: &str) -> Result<TransportUrl> {
        let input = input.trim();
        let mask = masked_range(input);
        // Where an ambiguous URL's password may end: nothing before this offset is quoted.
        let quotable_from = mask.map_or(0, |(_, end)| end);
        let bad = |reason: &str| {
            // An `@` after the netloc means the credentials were cut short by an unencoded
            // `/`, `?` or `#` (oslo, like urllib, ends the netloc at the first of them).
            let hint = if input.rfind('@').is_some_and(|at| at > netloc_end(input)) {
                " (a `/`, `?` or `#` in a user name or password must be percent-encoded: %2F, %3F, %23)"
            } else {
                ""
            };
            Error::InvalidUrl {
                url: redact_unparsed(input),
                reason: format!("{reason}{hint}"),
            }
        };
        let (scheme_text, rest) = input
            .split_once("://")
            .ok_or_else(|| bad("no scheme (expected e.g. rabbit:// or memory://)"))?;
        let scheme = match scheme_text.split('+').next().unwrap_or_default() {
            "rabbit" | "amqp" | "kombu" => Scheme::Rabbit,
            "memory" | "fake" => Scheme::Memory,
            "amqps" => Scheme::Rabbit,
            "" => return Err(bad("no scheme (expected e.g. rabbit:// or memory://)")),
            _ => {
                return Err(bad(
                    "unknown scheme (expected rabbit, amqp, kombu, memory or fake)",
                ))
            }
        };
        if input.rfind('@').is_some_and(|at| at > netloc_end(input)) {
            // oslo would take a password piece as the host (`user:12/x@h` → host `user`, port
            // 12), then show it in every log line: refuse it instead.
            return Err(bad("an `@` after the host part"));
        }
        let default_port = if scheme_text.split('+').next() == Some("amqps") {
            DEFAULT_TLS_PORT
        } else {
            DEFAULT_PORT
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
        for (index, part) in netloc.split(',').filter(|p| !p.is_empty()).enumerate() {
            hosts.push(parse_host(part, index + 1, default_port).map_err(|r| bad(&r))?);
        }
        let virtual_host = match path {
            Some(p) => Some(
                percent_decode(&p[1..], false)
                    .map_err(|r| bad(&format!("{r} in the virtual host")))?,
            ),
            None => None,
        };
        let query = match query_text {
            Some(q) => {
                let quotable = offset_in(input, q) >= quotable_from;
                parse_query(q, quotable).map_err(|r| bad(&r))?
            }
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

    /// `true` for `amqps://`: TLS, port 5671 by default.
    pub fn is_tls(&self) -> bool {
        self.scheme_text.split('+').next() == Some("amqps")
    }

    fn default_port(&self) -> u16 {
        if self.is_tls() {
            DEFAULT_TLS_PORT
        } else {
            DEFAULT_PORT
        }
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
                port: self.default_port(),
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

/// One host of the netloc. Errors name the part at fault ("invalid port"), never its text:
/// with an unencoded `/`, `?` or `#` in a password, any part may be a piece of the password.
/// `number` counts from 1, for the messages.
fn parse_host(part: &str, number: usize, default_port: u16) -> std::result::Result<Host, String> {
    let (creds, hostport) = match part.rsplit_once('@') {
        Some((c, h)) => (Some(c), h),
        None => (None, part),
    };
    let (username, password) = match creds {
        Some(c) => {
            let (user, pass) = c.split_once(':').unwrap_or((c, ""));
            (
                percent_decode(user, false)
                    .map_err(|e| format!("{e} in the user name of host {number}"))?,
                percent_decode(pass, false)
                    .map_err(|e| format!("{e} in the password of host {number}"))?,
            )
        }
        None => (String::new(), String::new()),
    };
    let (hostname, port_text) = if let Some(v6) = hostport.strip_prefix('[') {
        let end = v6
            .find(']')
            .ok_or_else(|| format!("invalid IPv6 address in host {number} (missing `]`)"))?;
        let port = v6[end + 1..].strip_prefix(':');
        (v6[..end].to_string(), port)
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    let port = match port_text {
        None | Some("") => default_port,
        Some(p) => p
            .parse::<u16>()
            .map_err(|_| format!("invalid port in host {number} (expected 0 to 65535)"))?,
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

/// The `key=value` options. `quotable`: the query lies wholly after where a password may end,
/// so an error may quote a key.
fn parse_query(text: &str, quotable: bool) -> std::result::Result<Vec<(String, String)>, String> {
    let name = |key: &str| {
        if quotable {
            format!("option `{key}`")
        } else {
            "an option".to_string()
        }
    };
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            let key = percent_decode(pair, true).unwrap_or_default();
            return Err(format!("{} has no value", name(&key)));
        };
        let key = percent_decode(k, true).map_err(|e| format!("{e} in the query"))?;
        let value =
            percent_decode(v, true).map_err(|e| format!("{e} in the value of {}", name(&key)))?;
        if value.is_empty() {
            return Err(format!("{} has an empty value", name(&key)));
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

/// Byte offset of `part` (a subslice of `whole`) in `whole`.
fn offset_in(whole: &str, part: &str) -> usize {
    (part.as_ptr() as usize).saturating_sub(whole.as_ptr() as usize)
}

/// Where oslo (urllib) ends the netloc: the first `/`, `?` or `#` after `://`.
fn netloc_end(input: &str) -> usize {
    let start = input.find("://").map_or(0, |i| i + 3);
    input[start..]
        .find(['/', '?', '#'])
        .map_or(input.len(), |i| start + i)
}

/// The bytes of a URL that may hold a password, when the URL cannot be trusted to have been
/// parsed as its author meant: from the first `:` after `://` (or after a leading `[...]`)
/// to the **last** `@` of the whole string, since an unencoded `/`, `?`, `#`, `,` or `@` may
/// sit anywhere in the password; with no `@` at all, to the end (a password without a host).
/// `None` when there is no `:` before the last `@` (a user name only, or no credentials).
fn masked_range(input: &str) -> Option<(usize, usize)> {
    let start = input.find("://").map_or(0, |i| i + 3);
    let after = &input[start..];
    let search_from = if after.starts_with('[') {
        after.find(']').map_or(0, |i| i + 1)
    } else {
        0
    };
    let last_at = after.rfind('@');
    // With an `@`, the credentials begin at the start of the netloc, never inside `[...]`.
    let colon = match last_at {
        Some(_) => after.find(':'),
        None => after[search_from..].find(':').map(|i| i + search_from),
    }?;
    let end = match last_at {
        Some(at) if colon < at => at,
        Some(_) => return None,
        None => after.len(),
    };
    Some((start + colon + 1, start + end))
}

/// Redaction of a URL that failed to parse, where the password's end is unknown: everything
/// [`masked_range`] covers becomes `***`, e.g. `rabbit://user:***@host:notaport/`.
fn redact_unparsed(input: &str) -> String {
    match masked_range(input) {
        Some((from, to)) => format!("{}***{}", &input[..from], &input[to..]),
        None => input.to_string(),
    }
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
    fn user_names_and_passwords_are_percent_decoded_but_not_plus_decoded() {
        let url = TransportUrl::parse("rabbit://us%40er%3Ax%2Fy:p%40ss%3Aw@h/").unwrap();
        let host = &url.hosts()[0];
        assert_eq!(host.username, "us@er:x/y");
        assert_eq!(host.login_username(), "us@er:x/y");
        assert_eq!(host.password(), "p@ss:w");
        assert_eq!(host.hostname, "h");
        let url = TransportUrl::parse("rabbit://a+b%20c%C3%A9:p@h/").unwrap();
        assert_eq!(url.hosts()[0].username, "a+b c\u{e9}");
        // Every host's user name, not only the first one's.
        let url = TransportUrl::parse("rabbit://u%31:p@h1,u%32:p@h2/").unwrap();
        let users: Vec<&str> = url.hosts().iter().map(|h| h.username.as_str()).collect();
        assert_eq!(users, ["u1", "u2"]);
        let err = TransportUrl::parse("rabbit://u%zz:p@h/").unwrap_err();
        assert!(
            err.to_string().contains("in the user name of host 1"),
            "{err}"
        );
    }

    #[test]
    fn unparseable_urls_are_redacted_up_to_the_last_at() {
        // The credentials run from the first `:` to the *last* `@`: a user name may hold an
        // `@` (split at the first one, the password would show).
        let err = TransportUrl::parse("rabbit://us@er:secret@h:notaport/").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid transport URL rabbit://us@er:***@h:notaport/: invalid port in host 1 \
             (expected 0 to 65535)"
        );
        assert!(!format!("{err:?}").contains("secret"));
        for (url, redacted) in [
            (
                "rabbit://us@er:secret@h:notaport/",
                "rabbit://us@er:***@h:notaport/",
            ),
            ("rabbit://u:se@cr@et@h:x/", "rabbit://u:***@h:x/"),
            ("rabbit://a@b@c:secret@h:x/", "rabbit://a@b@c:***@h:x/"),
            (
                "rabbit://u:secret@h1,v:secret@h2:x/",
                "rabbit://u:***@h2:x/",
            ),
            ("rabbit://u:secret", "rabbit://u:***"),
            ("rabbit://user@h:bad/", "rabbit://user@h:bad/"),
        ] {
            assert_eq!(redact_unparsed(url), redacted, "{url}");
        }
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
    fn amqps_means_tls_on_port_5671_by_default() {
        let url = TransportUrl::parse("amqps://u:p@h1,u:p@h2:5999/").unwrap();
        assert!(url.is_tls());
        assert_eq!(url.scheme(), Scheme::Rabbit);
        assert_eq!(url.hosts()[0].port, 5671);
        assert_eq!(url.hosts()[1].port, 5999);
        assert_eq!(
            TransportUrl::parse("amqps://").unwrap().effective_hosts()[0].port,
            5671
        );
        let plain = TransportUrl::parse("rabbit://u:p@h1/").unwrap();
        assert!(!plain.is_tls());
        assert_eq!(plain.hosts()[0].port, 5672);
    }

    #[test]
    fn bad_urls_are_errors_without_passwords() {
        for bad in [
            "rabbit://u:secret@h:notaport/",
            "http://u:secret@h/",
            "u:secret@h",
            "rabbit://u:secret@h/%zz",
            "rabbit://u:secret@h/?novalue",
            "amqps://u:secret@h:x/",
        ] {
            let err = TransportUrl::parse(bad).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, Error::InvalidUrl { .. }), "{bad}: {err:?}");
            assert!(!text.contains("secret"), "{text}");
            assert!(!format!("{err:?}").contains("secret"));
        }
    }

    /// Every substring of at least 3 bytes (on char boundaries) of `secret`, itself included.
    fn fragments(secret: &str) -> Vec<&str> {
        let bounds: Vec<usize> = secret
            .char_indices()
            .map(|(i, _)| i)
            .chain([secret.len()])
            .collect();
        let mut out = Vec::new();
        for (a, &from) in bounds.iter().enumerate() {
            for &to in &bounds[a + 1..] {
                if to - from >= 3 {
                    out.push(&secret[from..to]);
                }
            }
        }
        out
    }

    /// Percent-encodes everything but unreserved characters.
    fn encode(text: &str) -> String {
        text.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    #[test]
    fn url_errors_never_show_any_part_of_the_password() {
        // Passwords with every character that cuts a netloc short or splits credentials,
        // in several positions; none shares 3 bytes with the rest of the URLs.
        let passwords = [
            "S3cr/et?#@x",
            "Qz8?wv/Lk",
            "Jh7#Rt4/Nm",
            "Kx7#Yw2?Vb/@@",
            "p@ss:W0rd/Gq",
            "Vb9,Ty6@Fk:",
            "Zq9:/@/:Dh",
            "Wn3%zQEv",
            "Ll4%feOp/",
            "/Pk5Xc",
            "?Mj6Uv",
            "#Rr7Io",
            "Ae2 Bf3\tCg4",
            "Gé8/Hñ9?",
        ];
        let templates = [
            "rabbit://user:{P}@host:5672/",
            "rabbit://user:{P}@host:notaport/",
            "rabbit://user:{P}@host:99999/",
            "rabbit://user:{P}@host/",
            "rabbit://user:{P}@host",
            "rabbit://user:{P}@host:5672,user:{P}@host2:5673/vhost",
            "rabbit://user:{P}@host:5672,user:{P}@host2:bad/vhost",
            "rabbit://user:{P}@host:5672/?bad_option=1",
            "rabbit://user:{P}@[::1/",
            "rabbit://user:{P}@[::1]:bad/",
            "rabbit://user:{P}@host/%zz",
            "rabbit://user:{P}@host/%ff",
            "rabbit://user:{P}@host/?novalue",
            "rabbit://user:{P}@host/?empty=",
            "rabbit://user:{P}@host/?k=%zz",
            "rabbit://user:{P}@host:5672?novalue",
            "rabbit://user:{P}%zz@host/",
            "rabbit://user:{P}%ff@host/",
            "rabbit://user%zz:{P}@host/",
            "rabbit://us@er:{P}@host:notaport/",
            "rabbit://us:er:{P}@host:notaport/",
            "rabbit://user:{P}@@host:bad/",
            "rabbit://:{P}@host:bad/",
            "rabbit://user:{P}",
            "rabbit://user:{P}/",
            "rabbit://user:{P}?",
            "rabbit://user:{P}#",
            "rabbit://user:{P}@",
            "rabbit://host:5672,user:{P}@host2:bad/",
            "rabbit://[user:{P}@host/",
            "amqps://user:{P}@host/",
            "http://user:{P}@host/",
            "://user:{P}@host/",
            "+rabbit://user:{P}@host/",
            "user:{P}@host",
            "user:{P}",
            "rabbit:/user:{P}@host",
            "rabbit:user:{P}@host:bad",
            "  rabbit://user:{P}@host:bad/  ",
            "rabbit://user:{P}@host:bad/?a=b@c",
            "rabbit://user:{P}@host/?x=1&novalue@tail",
        ];
        let mut checked = 0;
        for password in passwords {
            for template in templates {
                for written in [password.to_string(), encode(password)] {
                    let url = template.replace("{P}", &written);
                    let Err(err) = TransportUrl::parse(&url) else {
                        continue;
                    };
                    assert!(matches!(err, Error::InvalidUrl { .. }), "{url}: {err:?}");
                    // With no host after the password (`rabbit://user:p@ss`), what follows its
                    // last `@` *is* the host for oslo (and for a URL that parses): only the
                    // part before it is the password. Otherwise all of it is.
                    let host_follows = template.rsplit("{P}").next().unwrap_or("").contains('@');
                    let secret = match written.rfind('@') {
                        Some(at) if !host_follows => &password[..at],
                        _ => password,
                    };
                    // The password and its pieces, as written and percent-encoded.
                    let mut secrets = vec![];
                    for piece in fragments(secret) {
                        secrets.push(piece.to_string());
                        secrets.push(encode(piece));
                    }
                    let shown = format!("{err}");
                    let debug = format!("{err:?}");
                    for secret in &secrets {
                        assert!(
                            !shown.contains(secret.as_str()) && !debug.contains(secret.as_str()),
                            "{url}\n shows {secret:?}:\n {shown}\n {debug}"
                        );
                    }
                    checked += 1;
                }
            }
        }
        // Most of these are errors whatever the password; a check that the loop did its work.
        assert!(checked > 600, "only {checked} errors checked");
    }

    #[test]
    fn url_errors_name_positions_and_hint_at_encoding() {
        let err = TransportUrl::parse("rabbit://user:pa/ss@host:5672/").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid transport URL rabbit://user:***@host:5672/: an `@` after the host part \
             (a `/`, `?` or `#` in a user name or password must be percent-encoded: %2F, %3F, \
             %23)"
        );
        let err = TransportUrl::parse("rabbit://u:p@h1,u:p@h2:x/").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid transport URL rabbit://u:***@h2:x/: invalid port in host 2 (expected 0 to 65535)"
        );
        // Nothing to hide: the text after the last `@` is quoted as it is.
        let err = TransportUrl::parse("rabbit://u:p@h/?novalue").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid transport URL rabbit://u:***@h/?novalue: option `novalue` has no value"
        );
        let err = TransportUrl::parse("rabbit://h:bad/nova").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid transport URL rabbit://h:***: invalid port in host 1 (expected 0 to 65535)"
        );
        let err = TransportUrl::parse("rabbit://[::1]:bad/").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid transport URL rabbit://[::1]:***: invalid port in host 1 (expected 0 to 65535)"
        );
        let err = TransportUrl::parse("rabbit://user@h:bad/").unwrap_err();
        assert!(err
            .to_string()
            .starts_with("invalid transport URL rabbit://user@h:bad/:"));
    }

    #[test]
    fn unencoded_separators_in_passwords_are_refused() {
        // urllib ends the netloc at the first `/`: oslo would connect to host "user", port 12
        // (a piece of the password), vhost "ss@host/", and log that host. warren refuses it.
        for bad in [
            "rabbit://user:12/ss@host/",
            "rabbit://guest:12?Sx9=1@h/",
            "rabbit://guest:12#Sx9@h/",
        ] {
            let err = TransportUrl::parse(bad).unwrap_err().to_string();
            assert!(err.contains("percent-encoded"), "{err}");
            assert!(!err.contains("12") && !err.contains("Sx9"), "{err}");
        }
        // Encoded, the same password is one.
        let url = TransportUrl::parse("rabbit://user:pa%2Fss%3F%23@host/").unwrap();
        assert_eq!(url.hosts()[0].password(), "pa/ss?#");
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

    #[test]
    fn guest_is_the_login_only_when_the_url_names_nobody() {
        let host = |url: &str| TransportUrl::parse(url).unwrap().hosts()[0].clone();
        let nobody = host("rabbit://h:5672/");
        assert_eq!(
            (nobody.login_username(), nobody.login_password()),
            ("guest", "guest")
        );
        let no_password = host("rabbit://bob@h:5672/");
        assert_eq!(
            (no_password.login_username(), no_password.login_password()),
            ("bob", "")
        );
        let no_user = host("rabbit://:secret@h:5672/");
        assert_eq!(
            (no_user.login_username(), no_user.login_password()),
            ("guest", "secret")
        );
    }

    #[test]
    fn urls_and_hosts_show_every_host_and_no_password() {
        let url = TransportUrl::parse(
            "rabbit://a:pa@h1:5672,b:pb@h2:5673/vh?heartbeat_timeout_threshold=10",
        )
        .unwrap();
        assert_eq!(
            url.to_string(),
            "rabbit://a:***@h1:5672,b:***@h2:5673/vh?heartbeat_timeout_threshold=10"
        );
        assert_eq!(
            format!("{url:?}"),
            "TransportUrl(rabbit://a:***@h1:5672,b:***@h2:5673/vh?heartbeat_timeout_threshold=10)"
        );
        assert_eq!(format!("{:?}", url.hosts()[1]), "Host(b:***@h2:5673)");
    }

    #[test]
    fn a_url_without_a_scheme_says_so() {
        for input in ["://h:5672/", "+ssl://h/"] {
            match TransportUrl::parse(input) {
                Err(Error::InvalidUrl { reason, .. }) => {
                    assert!(reason.starts_with("no scheme"), "{input}: {reason}")
                }
                other => panic!("{input}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_ipv6_host_is_not_taken_for_a_password_when_redacting() {
        // No `@`: what follows the port's `:` may be a password without a host, so it is
        // masked; the bracketed address before it is not.
        match TransportUrl::parse("rabbit://[::]:notaport/") {
            Err(Error::InvalidUrl { url, .. }) => {
                assert!(url.starts_with("rabbit://[::]:"), "{url}");
                assert!(!url.contains("notaport"), "{url}");
            }
            other => panic!("{other:?}"),
        }
    }
}
