//! The [`Transport`] trait: the seeds' vocabulary, implemented by [`Node`] for every backend.

use std::future::Future;
use std::time::Duration;

use hivewire_protocol::{AgentId, Message};

use crate::{Node, Subscription, TransportError, TransportStats};

/// One messaging API over every backend.
///
/// Every backend yields a [`Node`], which implements this trait; code written against it moves
/// between backends by changing the URL alone.
pub trait Transport: Send + Sync {
    /// This end's agent id.
    fn agent_id(&self) -> &AgentId;

    /// Sends `msg` to agent `to`.
    fn send(&self, to: &str, msg: Message) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// The next message addressed to this end, with its sender.
    fn receive(&self) -> impl Future<Output = Result<(AgentId, Message), TransportError>> + Send;

    /// Sends a `Broadcast` message to every agent.
    fn broadcast(&self, msg: Message) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Sends a `Request` message to `to` and waits for its response.
    fn request(
        &self,
        to: &str,
        msg: Message,
        timeout: Duration,
    ) -> impl Future<Output = Result<Message, TransportError>> + Send;

    /// Subscribes to events matching `pattern`.
    fn subscribe(&self, pattern: &str) -> impl Future<Output = Result<Subscription, TransportError>> + Send;

    /// Publishes an `Event` message to the agents subscribed to its topic.
    fn publish(&self, msg: Message) -> impl Future<Output = Result<(), TransportError>> + Send;

    /// Closes this end.
    fn close(&self) -> impl Future<Output = ()> + Send;

    /// Counters.
    fn stats(&self) -> TransportStats;
}

impl Transport for Node {
    fn agent_id(&self) -> &AgentId {
        Node::agent_id(self)
    }

    fn send(&self, to: &str, msg: Message) -> impl Future<Output = Result<(), TransportError>> + Send {
        Node::send(self, to, msg)
    }

    fn receive(&self) -> impl Future<Output = Result<(AgentId, Message), TransportError>> + Send {
        Node::receive(self)
    }

    fn broadcast(&self, msg: Message) -> impl Future<Output = Result<(), TransportError>> + Send {
        Node::broadcast(self, msg)
    }

    fn request(
        &self,
        to: &str,
        msg: Message,
        timeout: Duration,
    ) -> impl Future<Output = Result<Message, TransportError>> + Send {
        Node::request_message(self, AgentId::new(to), msg, timeout)
    }

    fn subscribe(&self, pattern: &str) -> impl Future<Output = Result<Subscription, TransportError>> + Send {
        Node::subscribe(self, pattern)
    }

    fn publish(&self, msg: Message) -> impl Future<Output = Result<(), TransportError>> + Send {
        Node::publish_message(self, msg)
    }

    fn close(&self) -> impl Future<Output = ()> + Send {
        Node::close(self)
    }

    fn stats(&self) -> TransportStats {
        Node::stats(self)
    }
}
