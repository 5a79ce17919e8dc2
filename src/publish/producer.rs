//! The transactional producer of one partition's outbox.
//!
//! Every owned partition publishes through its own producer whose `transactional.id` is the
//! outbox's key name, so the broker knows one publisher per outbox. A new owner's
//! `init_transactions` fences every earlier producer of that outbox: the old owner's open
//! transaction is aborted and anything it still has queued or in flight (a zombie resumed
//! after SIGSTOP, a round stuck behind a stalled broker) is refused by the broker or lands
//! inside the aborted transaction, invisible to `read_committed` consumers. This is the
//! broker-side half of the ownership fence; the Redis epoch is the other half (Kafka Streams
//! fences its tasks' producers the same way).

use super::position::OutboxPositions;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::ClientConfig;
use std::sync::Arc;
use std::time::Duration;

/// How long one `init_transactions`, `commit_transaction` or `abort_transaction` may block.
const TXN_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a transactional call failed, as the publisher must react to it.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// A newer producer of the same outbox initialised: this one may never publish again.
    #[error("fenced by a newer producer of this outbox: {0}")]
    Fenced(KafkaError),
    /// The producer is unusable for another reason: a new one must be created.
    #[error("producer failed fatally: {0}")]
    Fatal(KafkaError),
    /// The call failed; the transaction is aborted (or was never begun) and can be retried.
    #[error("{0}")]
    Failed(KafkaError),
    /// The call did not return in time (librdkafka 2.12 can block past its timeout in
    /// `send_offsets_to_transaction` when the group coordinator's broker went away,
    /// confluentinc/librdkafka#5456 and #5511): the producer is abandoned and replaced; the new
    /// one's initialisation fences it and aborts its open transaction.
    #[error("a transactional call did not return within {0:?}; replacing the producer")]
    Stuck(Duration),
}

impl TxnError {
    /// Classifies a librdkafka error of a transactional call.
    pub fn classify(error: KafkaError) -> Self {
        let fatal = matches!(&error, KafkaError::Transaction(e) if e.is_fatal());
        if is_fence(&error) {
            Self::Fenced(error)
        } else if fatal {
            Self::Fatal(error)
        } else {
            Self::Failed(error)
        }
    }

    /// Classifies an error of a call made inside a transaction (begin, send offsets, commit,
    /// abort) that neither a retry nor an abort handled: the transaction may still be open
    /// (librdkafka's `__STATE`, `__INVALID_ARG`, ...), so the producer cannot simply begin
    /// again. Only a new producer, whose initialisation ends (commits or aborts) the open
    /// transaction, can go on: fatal unless it says we were fenced.
    pub fn unfinished(error: KafkaError) -> Self {
        if is_fence(&error) {
            Self::Fenced(error)
        } else {
            Self::Fatal(error)
        }
    }
}

/// Whether `error` says a newer producer with our `transactional.id` exists.
pub fn is_fence(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
        )
    )
}

/// Whether Kafka refused a record for a reason that retrying the same record cannot change
/// (too large for the topic, not authorized, invalid): such a record is set aside or blocks
/// its partition's outbox, and is never re-sent in a loop with the records around it.
pub fn is_permanent(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::PolicyViolation
        )
    )
}

/// One partition's transactional producer. Its handles share one librdkafka client; the
/// last one dropped on an async worker destroys it on a blocking thread instead (destroying
/// joins librdkafka's threads, and a client abandoned in a stuck call may take long).
#[derive(Clone)]
pub struct TxnProducer {
    /// `None` only while being dropped.
    inner: Option<Arc<FutureProducer>>,
}

impl Drop for TxnProducer {
    fn drop(&mut self) {
        // Only the last handle gets the client back; a clone moved into a blocking call is
        // dropped on that thread.
        let Some(last) = self.inner.take().and_then(Arc::into_inner) else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || drop(last))),
            Err(_) => drop(last),
        }
    }
}

impl TxnProducer {
    /// Creates the producer of the outbox `transactional_id` from the shared producer settings
    /// and initialises it (fencing earlier producers of that outbox). Blocks: run it off the
    /// async workers.
    ///
    /// # Errors
    /// [`TxnError`]: creation refused (a configuration error: fatal) or initialisation failed.
    pub fn init_blocking(base: &ClientConfig, transactional_id: &str) -> Result<Self, TxnError> {
        let inner: FutureProducer = base
            .clone()
            .set("transactional.id", transactional_id)
            .create()
            .map_err(TxnError::Fatal)?;
        inner
            .init_transactions(TXN_CALL_TIMEOUT)
            .map_err(TxnError::classify)?;
        Ok(Self {
            inner: Some(Arc::new(inner)),
        })
    }

    fn client(&self) -> &FutureProducer {
        self.inner.as_ref().expect("not dropped")
    }

    /// The producer, to queue records on.
    pub fn producer(&self) -> &FutureProducer {
        self.client()
    }

    /// Begins a transaction (local, does not block).
    ///
    /// # Errors
    /// [`TxnError`].
    pub fn begin(&self) -> Result<(), TxnError> {
        self.client()
            .begin_transaction()
            .map_err(TxnError::unfinished)
    }

    /// The error the open transaction failed with, when librdkafka holds it in its abortable
    /// state: then `begin_transaction` is refused, changing nothing, with the transaction's
    /// own error. When a topic partition cannot be added to the transaction (e.g. a topic
    /// the producer may not write to: `TOPIC_AUTHORIZATION_FAILED`), librdkafka fails the
    /// whole transaction and every record's delivery report says only that it was purged;
    /// this is where the reason is. `None` when the transaction has not failed (the call is
    /// then refused as out of state; it is only made inside a transaction).
    pub fn failed_transaction_error(&self) -> Option<KafkaError> {
        match self.client().begin_transaction() {
            Err(e @ KafkaError::Transaction(_)) if requires_abort(&e) => Some(e),
            _ => None,
        }
    }

    /// Commits the open transaction (blocks until the broker took it; off the async workers),
    /// together with the outbox position `published` when given ([`RoundPosition`]).
    /// A retriable failure (a timeout) is retried as librdkafka requires: the transaction is
    /// then in the middle of committing and only another commit call can finish it.
    ///
    /// # Errors
    /// [`TxnError`]; on `Failed` the transaction has been aborted; on `Fatal` it may still be
    /// open (only a new producer ends it).
    pub async fn commit(&self, published: Option<RoundPosition>) -> Result<(), TxnError> {
        let p = Arc::clone(self.inner.as_ref().expect("not dropped"));
        within_deadline(move || {
            if let Some(at) = published {
                let offsets = at.positions.round_offsets(at.partition, &at.published);
                if let Err(e) =
                    p.send_offsets_to_transaction(&offsets, at.positions.group(), TXN_CALL_TIMEOUT)
                {
                    if requires_abort(&e) || retriable(&e) {
                        abort_blocking(&p)?;
                        return Err(TxnError::Failed(e));
                    }
                    return Err(TxnError::unfinished(e));
                }
            }
            let mut last = None;
            for _ in 0..TXN_CALL_ATTEMPTS {
                match p.commit_transaction(TXN_CALL_TIMEOUT) {
                    Ok(()) => return Ok(()),
                    Err(e) if retriable(&e) => {
                        tracing::warn!(error = %e, "Committing a publish transaction failed; retrying the commit.");
                        last = Some(e);
                    }
                    Err(e) if requires_abort(&e) => {
                        abort_blocking(&p)?;
                        return Err(TxnError::Failed(e));
                    }
                    Err(e) => return Err(TxnError::unfinished(e)),
                }
            }
            // Still not committed: only a new producer (whose initialisation completes or
            // aborts this transaction) can go on.
            Err(TxnError::Fatal(last.expect("an attempt failed")))
        })
        .await
    }

    /// Aborts the open transaction: nothing produced in it becomes visible to
    /// `read_committed` consumers.
    ///
    /// # Errors
    /// [`TxnError`].
    pub async fn abort(&self) -> Result<(), TxnError> {
        let p = Arc::clone(self.inner.as_ref().expect("not dropped"));
        within_deadline(move || abort_blocking(&p)).await
    }
}

/// The outbox position a round's transaction commits: the last outbox id it publishes.
pub struct RoundPosition {
    /// Where positions are kept.
    pub positions: Arc<OutboxPositions>,
    /// The input partition whose outbox this is.
    pub partition: i32,
    /// The position the round leaves the outbox at (its last stream id, cut-offs switches).
    pub published: super::position::Published,
}

/// How long a blocking transactional step (with its own retries) may take before the
/// producer is considered stuck.
pub const CALL_DEADLINE: Duration = Duration::from_secs(45);

/// Runs a blocking transactional step off the async workers, giving up on it after
/// [`CALL_DEADLINE`] (the thread is left to finish on its own; its producer is replaced).
pub async fn within_deadline<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, TxnError> + Send + 'static,
) -> Result<T, TxnError> {
    match tokio::time::timeout(CALL_DEADLINE, tokio::task::spawn_blocking(call)).await {
        Ok(joined) => joined.expect("transactional call task"),
        Err(_) => Err(TxnError::Stuck(CALL_DEADLINE)),
    }
}

/// Attempts of a blocking transactional call that keeps failing retriably.
const TXN_CALL_ATTEMPTS: usize = 3;

fn retriable(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t) if t.is_retriable())
}

fn requires_abort(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t) if t.txn_requires_abort())
}

/// Aborts, retrying retriable failures; a producer that cannot abort is unusable.
fn abort_blocking(p: &FutureProducer) -> Result<(), TxnError> {
    let mut last = None;
    for _ in 0..TXN_CALL_ATTEMPTS {
        match p.abort_transaction(TXN_CALL_TIMEOUT) {
            Ok(()) => return Ok(()),
            Err(e) if retriable(&e) => {
                tracing::warn!(error = %e, "Aborting a publish transaction failed; retrying the abort.");
                last = Some(e);
            }
            Err(e) => return Err(TxnError::unfinished(e)),
        }
    }
    Err(TxnError::Fatal(last.expect("an attempt failed")))
}
