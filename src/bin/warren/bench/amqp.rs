//! Plain amiquip connections for the bench's own needs (deleting its queues) and for the
//! bare-amiquip baseline (`examples/bare_amiquip.rs` includes this file): TCP_NODELAY on, as
//! warren's connections, so the baseline is not slowed down by Nagle.

use std::net::TcpStream;
use std::time::Duration;

use amiquip::{Auth, Connection, ConnectionOptions, ConnectionTuning, QueueDeleteOptions};
use warren::{Scheme, TransportUrl};

/// Opens a connection to the first host of `url` (a warren / oslo transport URL).
pub fn open(url: &str) -> Result<Connection, String> {
    let parsed = TransportUrl::parse(url).map_err(|e| e.to_string())?;
    if parsed.scheme() != Scheme::Rabbit {
        return Err(format!("{} is not a RabbitMQ URL", parsed));
    }
    let host = parsed
        .effective_hosts()
        .into_iter()
        .next()
        .ok_or_else(|| "the URL names no host".to_string())?;
    let address = host.address();
    let stream = TcpStream::connect(address.as_str()).map_err(|e| format!("{address}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("{address}: {e}"))?;
    let stream = mio::net::TcpStream::from_stream(stream).map_err(|e| format!("{address}: {e}"))?;
    let options = ConnectionOptions::default()
        .auth(Auth::Plain {
            username: host.login_username().to_string(),
            password: host.login_password().to_string(),
        })
        .virtual_host(parsed.virtual_host())
        .heartbeat(60)
        .connection_timeout(Some(Duration::from_secs(10)));
    Connection::insecure_open_stream(stream, options, ConnectionTuning::default())
        .map_err(|e| format!("{address}: {e}"))
}

/// Deletes `queues` (those that exist), reporting failures on stderr.
pub fn delete_queues(url: &str, queues: &[String]) {
    if queues.is_empty() || !url.contains("://") || url.starts_with("memory://") {
        return;
    }
    let mut connection = match open(url) {
        Ok(connection) => connection,
        Err(e) => {
            eprintln!("cannot delete the bench queues {queues:?}: {e}");
            return;
        }
    };
    for queue in queues {
        // One channel per queue: a refusal closes its channel only.
        let deleted = connection.open_channel(None).and_then(|channel| {
            channel.queue_delete(queue.as_str(), QueueDeleteOptions::default())?;
            channel.close()
        });
        if let Err(e) = deleted {
            eprintln!("cannot delete queue {queue}: {e}");
        }
    }
    let _ = connection.close();
}
