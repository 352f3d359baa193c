//! How a user unit-tests code built on warren without a broker: `memory://` runs the same
//! client, server and dispatcher in-process. `cargo test --example memory_unit_test` runs the
//! tests below (they also run with the project's `cargo test`).
//!
//! The "application" here is a tiny inventory service (server side) and the code that calls
//! it (client side), as a user's crate would have them.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::json;
use warren::{Endpoint, Error, Failure, RequestContext, RpcClient, RpcServer, Target, Transport};

/// Server side: the endpoint the service exposes.
pub fn inventory_endpoint(stock: Arc<Mutex<HashMap<String, u32>>>) -> Endpoint {
    #[derive(Deserialize)]
    struct Reserve {
        item: String,
        count: u32,
    }
    Endpoint::new().method("reserve", move |_: &RequestContext, r: Reserve| {
        let mut stock = stock.lock();
        let left = stock.get_mut(&r.item).ok_or_else(|| {
            Failure::new("KeyError", "builtins", format!("unknown item {}", r.item)).expected()
        })?;
        if *left < r.count {
            return Err(Failure::new(
                "ValueError",
                "builtins",
                format!("only {left} {} left", r.item),
            ));
        }
        *left -= r.count;
        Ok(*left)
    })
}

/// Client side: the code under test in the user's crate.
pub struct Inventory {
    client: RpcClient,
}

#[derive(Debug, PartialEq, Serialize)]
pub enum Reservation {
    Reserved { left: u32 },
    SoldOut,
}

impl Inventory {
    pub fn new(transport: &Transport) -> Inventory {
        Inventory {
            client: RpcClient::new(transport, Target::new("inventory")),
        }
    }

    pub fn reserve(&self, item: &str, count: u32) -> Result<Reservation, Error> {
        match self.client.call(
            &RequestContext::new(),
            "reserve",
            &json!({"item": item, "count": count}),
        ) {
            Ok(left) => Ok(Reservation::Reserved { left }),
            Err(e) if e.is_remote("ValueError") => Ok(Reservation::SoldOut),
            Err(e) => Err(e),
        }
    }
}

/// Starts the service on `url` with some stock.
pub fn serve(url: &str) -> Result<(Transport, RpcServer), Error> {
    let transport = Transport::new(url)?;
    let stock = Arc::new(Mutex::new(HashMap::from([("apple".to_string(), 3)])));
    let server = RpcServer::builder(&transport, Target::new("inventory").with_server("test"))
        .endpoint(inventory_endpoint(stock))
        .workers(2)
        .build()?;
    server.start()?;
    Ok((transport, server))
}

fn main() -> Result<(), Error> {
    let (transport, _server) = serve("memory://inventory-demo/")?;
    let inventory = Inventory::new(&transport);
    println!("reserve 2 apples -> {:?}", inventory.reserve("apple", 2)?);
    println!("reserve 2 apples -> {:?}", inventory.reserve("apple", 2)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each test names its own in-process bus, so tests running in parallel never meet.
    #[test]
    fn reserving_decrements_the_stock() {
        let (transport, _server) = serve("memory://inventory-decrement/").unwrap();
        let inventory = Inventory::new(&transport);
        assert_eq!(
            inventory.reserve("apple", 2).unwrap(),
            Reservation::Reserved { left: 1 }
        );
        assert_eq!(
            inventory.reserve("apple", 1).unwrap(),
            Reservation::Reserved { left: 0 }
        );
    }

    #[test]
    fn too_many_is_sold_out() {
        let (transport, _server) = serve("memory://inventory-sold-out/").unwrap();
        assert_eq!(
            Inventory::new(&transport).reserve("apple", 5).unwrap(),
            Reservation::SoldOut
        );
    }

    #[test]
    fn unknown_items_are_remote_key_errors() {
        let (transport, _server) = serve("memory://inventory-unknown/").unwrap();
        let error = Inventory::new(&transport).reserve("pear", 1).unwrap_err();
        assert!(error.is_remote("KeyError"), "{error:?}");
    }

    #[test]
    fn no_server_means_a_timeout_not_a_hang() {
        let transport =
            Transport::new("memory://inventory-nobody/?rpc_response_timeout=0.2").unwrap();
        let error = Inventory::new(&transport).reserve("apple", 1).unwrap_err();
        assert!(matches!(error, Error::Timeout { .. }), "{error:?}");
    }
}
