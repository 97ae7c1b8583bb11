//! What a `Conn` tells the registry ([`Notice`]), and the worker's line
//! that carries it ([`RegistryLink`]).

use std::{cell::RefCell, rc::Rc};

use actix::prelude::*;
use serde_json::Value;

use super::PresenceRegistry;
use crate::{
    ids::{ConnId, Meta, UserId},
    protocol::{Ends, Reason, Request},
};

/// What a `Conn` tells the registry.
#[derive(Debug)]
pub enum Notice {
    /// A connection came up on this node with its verified user and its
    /// metadata.
    Connected(ConnId, UserId, Option<Meta>),
    /// A connection on this node went away, why, and whether its presence
    /// ends at once (a sign-out) or after the grace.
    Disconnected(ConnId, Reason, Ends),
    /// A client request that needs the store or changes subscriptions
    /// (never one the Conn answers itself, such as `ping`), with its `ref`.
    Request(ConnId, Option<Value>, Request),
}

/// Several notices from one worker, in the order they happened.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Notices(pub Vec<Notice>);

/// A worker's line to the registry. `Conn`s on one worker tell it what
/// happened; whatever they tell it during one turn of the worker's event
/// loop crosses to the registry's thread as one message, not one each.
#[derive(Clone, Debug)]
pub struct RegistryLink(Rc<LinkInner>);

#[derive(Debug)]
struct LinkInner {
    registry: Addr<PresenceRegistry>,
    queue: RefCell<Vec<Notice>>,
}

impl RegistryLink {
    /// A link for the current worker.
    pub fn new(registry: Addr<PresenceRegistry>) -> Self {
        Self(Rc::new(LinkInner {
            registry,
            queue: RefCell::new(Vec::new()),
        }))
    }

    /// Queues `notice`; the worker's queue is sent once the current tasks
    /// have run.
    pub fn send(&self, notice: Notice) {
        let mut queue = self.0.queue.borrow_mut();
        queue.push(notice);
        if queue.len() == 1 {
            let link = self.0.clone();
            actix_rt::spawn(async move {
                tokio::task::yield_now().await;
                let notices = std::mem::take(&mut *link.queue.borrow_mut());
                link.registry.do_send(Notices(notices));
            });
        }
    }
}
