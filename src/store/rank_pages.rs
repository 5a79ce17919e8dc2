//! Paging through the customers of one rank sorted set whose ranked value lies in a range, by
//! a (value, customer) cursor (`lua/ranked_after.lua`): each page costs O(log² N + page)
//! wherever it starts, a member re-scored behind the cursor shifts nothing, and the cursor can
//! be stored so that a re-ranking resumes where it stopped after a crash or a handover.

use std::sync::LazyLock;

static RANKED_AFTER: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("lua/ranked_after.lua")));

/// The next page (at most `limit`) of `key`'s members with `lo <= value <= hi` (`hi = None`:
/// no upper end), in the set's order (value, then customer id bytes), after `cursor` (the
/// last `(value, customer)` of the previous page; `None` to start). Each with its value.
///
/// # Errors
/// The Redis error (or a malformed reply).
pub async fn page<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    key: &str,
    lo: i128,
    hi: Option<i128>,
    cursor: Option<(i128, &str)>,
    limit: usize,
) -> Result<Vec<(String, i128)>, redis::RedisError> {
    let reply: Vec<String> = RANKED_AFTER
        .key(key)
        .arg(lo.to_string())
        .arg(hi.map(|h| h.to_string()).unwrap_or_default())
        .arg(cursor.map(|(v, _)| v.to_string()).unwrap_or_default())
        .arg(cursor.map_or("", |(_, m)| m))
        .arg(limit.max(1))
        .invoke_async(conn)
        .await?;
    reply
        .chunks(2)
        .map(|pair| match pair {
            [member, score] => score
                .parse::<i128>()
                .map(|v| (member.clone(), v))
                .map_err(|_| malformed(score)),
            _ => Err(malformed("odd reply")),
        })
        .collect()
}

fn malformed(what: &str) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected ranked_after reply",
        what.to_owned(),
    ))
}
