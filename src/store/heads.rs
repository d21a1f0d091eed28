//! Subscribes' head reads, coalesced. Every subscribe to a topic with
//! history reads the topic's head; when many clients subscribe at once (a
//! node restarting behind a load balancer), one task reads the heads of
//! all waiting requests in one query instead of one query each.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Head, Store, StoreError};
use crate::topic::Topic;

/// Requests waiting for the reader; subscribes wait when it is full.
const QUEUE: usize = 4096;
/// Most topics read by one batch.
const BATCH: usize = 500;

struct Request {
    topic: Topic,
    reply: oneshot::Sender<Result<Head, StoreError>>,
}

/// The handle subscribes read heads through.
pub struct HeadReader {
    requests: mpsc::Sender<Request>,
}

impl HeadReader {
    /// Starts the reading task; it ends when `shutdown` is cancelled.
    pub fn spawn(store: Arc<Store>, shutdown: CancellationToken) -> (HeadReader, JoinHandle<()>) {
        let (requests, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(store, rx, shutdown));
        (HeadReader { requests }, task)
    }

    /// `topic`'s head, read together with those of concurrent callers.
    pub async fn head(&self, topic: &Topic) -> Result<Head, StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = Request {
            topic: topic.clone(),
            reply,
        };
        if self.requests.send(request).await.is_err() {
            return Err(StoreError::stopped());
        }
        answer.await.unwrap_or_else(|_| Err(StoreError::stopped()))
    }
}

async fn run(store: Arc<Store>, mut rx: mpsc::Receiver<Request>, shutdown: CancellationToken) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            received = rx.recv_many(&mut batch, BATCH) => {
                if received == 0 {
                    return;
                }
            }
        }
        let topics: Vec<&Topic> = batch.iter().map(|r| &r.topic).collect();
        let heads = store.heads(&topics).await.map_err(Arc::new);
        drop(topics);
        for (i, request) in batch.drain(..).enumerate() {
            let answer = match &heads {
                Ok(heads) => Ok(heads[i].clone()),
                Err(e) => Err(StoreError::Shared(Arc::clone(e))),
            };
            // The subscriber may have gone meanwhile.
            let _ = request.reply.send(answer);
        }
    }
}
