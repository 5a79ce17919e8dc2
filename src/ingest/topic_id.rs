//! The input topic's id: Kafka gives every topic a UUID when it is created, and a topic
//! deleted and created again under the same name gets a new one. A partition's stored offset
//! is paired with the id it was read from, so that a claim can tell a recreated topic from the
//! old one even when both logs have reached the stored offset at leader epoch 0, where the
//! KIP-320 validation cannot tell them apart (issue 11, item 10).
//!
//! rust-rdkafka 0.39 does not expose topic ids; librdkafka (≥ 2.3) reports them in its
//! DescribeTopics admin result, called here through the bindings.

use rdkafka::bindings as rd;
use rdkafka::client::Client;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use std::ffi::CString;
use std::time::Duration;

/// A Kafka topic id (UUID) as 32 hexadecimal digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicId(pub String);

impl std::fmt::Display for TopicId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Frees a librdkafka object when dropped.
struct Owned<T>(*mut T, unsafe extern "C" fn(*mut T));

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the pointer came from the matching librdkafka constructor and is freed once.
            unsafe { (self.1)(self.0) }
        }
    }
}

/// Asks the cluster for `topic`'s id through `client`, waiting at most `timeout`. `Ok(None)`:
/// the broker reports no id (a broker before Kafka 2.8).
///
/// # Errors
/// The request failed or timed out, or the topic does not exist
/// (`UnknownTopicOrPartition`).
pub fn topic_id<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<TopicId>, KafkaError> {
    let fail = |code| Err(KafkaError::AdminOp(code));
    let Ok(name) = CString::new(topic) else {
        return fail(RDKafkaErrorCode::InvalidTopic);
    };
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    let rk = client.native_ptr();
    // SAFETY: every object is created here, used while alive and freed once (`Owned`); the
    // result's descriptions belong to the event, which outlives their use.
    unsafe {
        let queue = Owned(rd::rd_kafka_queue_new(rk), rd::rd_kafka_queue_destroy);
        let mut names = [name.as_ptr()];
        let topics = Owned(
            rd::rd_kafka_TopicCollection_of_topic_names(names.as_mut_ptr(), 1),
            rd::rd_kafka_TopicCollection_destroy,
        );
        let options = Owned(
            rd::rd_kafka_AdminOptions_new(
                rk,
                rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS,
            ),
            rd::rd_kafka_AdminOptions_destroy,
        );
        let mut errstr = [0 as std::ffi::c_char; 256];
        rd::rd_kafka_AdminOptions_set_request_timeout(
            options.0,
            timeout_ms,
            errstr.as_mut_ptr(),
            errstr.len(),
        );
        rd::rd_kafka_DescribeTopics(rk, topics.0, options.0, queue.0);
        // A little longer than the request's own timeout, which then answers with an error.
        let event = Owned(
            rd::rd_kafka_queue_poll(queue.0, timeout_ms.saturating_add(1000)),
            rd::rd_kafka_event_destroy,
        );
        if event.0.is_null() {
            return fail(RDKafkaErrorCode::OperationTimedOut);
        }
        let err = rd::rd_kafka_event_error(event.0);
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return fail(err.into());
        }
        let result = rd::rd_kafka_event_DescribeTopics_result(event.0);
        if result.is_null() {
            return fail(RDKafkaErrorCode::Fail);
        }
        let mut n = 0usize;
        let descriptions = rd::rd_kafka_DescribeTopics_result_topics(result, &mut n);
        if descriptions.is_null() || n == 0 {
            return fail(RDKafkaErrorCode::UnknownTopicOrPartition);
        }
        let description = *descriptions;
        let error = rd::rd_kafka_TopicDescription_error(description);
        if !error.is_null() {
            let code = rd::rd_kafka_error_code(error);
            if code != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
                return fail(code.into());
            }
        }
        let uuid = rd::rd_kafka_TopicDescription_topic_id(description);
        if uuid.is_null() {
            return Ok(None);
        }
        let most = rd::rd_kafka_Uuid_most_significant_bits(uuid);
        let least = rd::rd_kafka_Uuid_least_significant_bits(uuid);
        Ok((most != 0 || least != 0).then(|| TopicId(format!("{most:016x}{least:016x}"))))
    }
}
