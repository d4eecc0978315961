//! The Redis cache.
//!
//! # Layout
//!
//! Every key of namespace `ns` starts with `sift:{ns}:`. The braces are a
//! Redis Cluster hash tag: a whole namespace lives in one slot, which is what
//! lets one Lua script read the namespace's generation pointer and its entries
//! atomically (a script may only touch keys of one slot).
//!
//! ```text
//! sift:{ns}:ptr           current generation N (absent: generation 0)
//! sift:{ns}:seq           counter handing out generation numbers
//! sift:{ns}:gens          generations that are not current but may still hold
//!                         keys (being built, or displaced and being deleted)
//! sift:{ns}:g<N>:k:<key>  one entry, with a native Redis TTL when it has one
//! sift:{ns}:g<N>:n        entries written to the generation and not deleted
//! sift:{ns}:g<N>:xc       hash: second -> entries whose TTL runs out in it
//! sift:{ns}:g<N>:xs       sorted set of the seconds in `xc`, to find due ones
//! sift:{ns}:g<N>:lease    present while a replacement builds generation N
//! ```
//!
//! Entries are plain keys rather than fields of one hash so that each has its
//! own native TTL (per-field TTLs need Redis 7.4) and a namespace of tens of
//! millions of entries is not one huge value.
//!
//! # Reads, writes and `len`
//!
//! `get`, `mget`, `set` and `delete` are Lua scripts (`EVALSHA`) that resolve
//! the pointer and touch the entries in one atomic step, so an `mget` never
//! mixes generations. `len` must not scan: `n` counts the generation's entries
//! and the expiry buckets (`xc`/`xs`, one field per second, not per entry)
//! record how many of them Redis will expire when; buckets whose second has
//! passed are folded into `n` by `len` and, a few at a time, by `set`. So `len`
//! is exact to within the second in which entries expire.
//!
//! # Replacing a namespace
//!
//! `replace_namespace` takes a fresh generation number, builds the generation
//! with pipelined chunks of `SET`s while no reader can see it, then flips the
//! pointer with one script and deletes the displaced generation with
//! `SCAN`+`UNLINK`. Every generation that is not current and not yet deleted
//! is listed in `gens`; one whose build lease has lapsed (a replacement that
//! crashed, or a deletion that failed half-way) is swept by the next
//! replacement of the namespace, so nothing leaks for good.
//!
//! The client is a [`ConnectionManager`]: one multiplexed connection shared by
//! every caller that reconnects by itself after the server went away.

use std::collections::HashMap;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, RedisError, Script};
use async_trait::async_trait;
use bytes::Bytes;

use super::embedded::{validate_key, validate_namespace};
use super::{Cache, CacheError};

/// Most entries written by one pipelined round trip of a replacement.
const CHUNK_ENTRIES: usize = 1000;
/// Most value bytes written by one pipelined round trip of a replacement.
const CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// How long a replacement may go between two chunks before its generation is
/// considered abandoned and may be swept by another replacement.
const BUILD_LEASE: Duration = Duration::from_secs(600);
/// Keys asked for per `SCAN` step when deleting a generation.
const SCAN_COUNT: usize = 1000;
/// How long one command may take before the call fails. Generous, because a
/// replacement chunk or a large `mget` moves megabytes.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Lua shared by every script. `KEYS[1]` is always the namespace's pointer and
/// `ARGV[1]` the namespace's key prefix `sift:{ns}:`; the other keys a script
/// touches share the pointer's hash tag, hence its cluster slot.
const LUA_COMMON: &str = r#"
local function generation()
  return ARGV[1] .. 'g' .. (redis.call('GET', KEYS[1]) or '0') .. ':'
end
local function now_seconds()
  return tonumber(redis.call('TIME')[1])
end
-- An entry expiring at `expires_ms` is counted in the bucket of the next whole
-- second, so a bucket is folded only once every entry in it has expired.
local function bucket_add(gen, expires_ms, delta)
  local second = math.floor(expires_ms / 1000) + 1
  local count = redis.call('HINCRBY', gen .. 'xc', second, delta)
  if count <= 0 then
    redis.call('HDEL', gen .. 'xc', second)
    redis.call('ZREM', gen .. 'xs', second)
  else
    redis.call('ZADD', gen .. 'xs', second, second)
  end
end
-- Subtracts the entries of due buckets (all expired by now) from the count.
local function fold(gen, limit)
  local due
  if limit then
    due = redis.call('ZRANGEBYSCORE', gen .. 'xs', '-inf', now_seconds(), 'LIMIT', 0, limit)
  else
    due = redis.call('ZRANGEBYSCORE', gen .. 'xs', '-inf', now_seconds())
  end
  local gone = 0
  for _, second in ipairs(due) do
    gone = gone + tonumber(redis.call('HGET', gen .. 'xc', second) or '0')
    redis.call('HDEL', gen .. 'xc', second)
    redis.call('ZREM', gen .. 'xs', second)
  end
  if gone > 0 then
    redis.call('DECRBY', gen .. 'n', gone)
  end
end
"#;

/// `ARGV[2..]`: keys. Returns their values (nil where missing), all from the
/// generation current when the script ran.
const LUA_READ: &str = r#"
local gen = generation()
local values = {}
for i = 2, #ARGV do
  values[i - 1] = redis.call('GET', gen .. 'k:' .. ARGV[i])
end
return values
"#;

/// `ARGV[2]`: key, `ARGV[3]`: value, `ARGV[4]`: TTL in ms, 0 for none.
const LUA_SET: &str = r#"
local gen = generation()
local entry = gen .. 'k:' .. ARGV[2]
fold(gen, 16)
local previous = redis.call('PEXPIRETIME', entry)
if previous == -2 then
  redis.call('INCR', gen .. 'n')
elseif previous >= 0 then
  bucket_add(gen, previous, -1)
end
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('SET', entry, ARGV[3], 'PX', ttl)
  bucket_add(gen, redis.call('PEXPIRETIME', entry), 1)
else
  redis.call('SET', entry, ARGV[3])
end
return 1
"#;

/// `ARGV[2]`: key. Returns 1 if a live entry was deleted.
const LUA_DELETE: &str = r#"
local gen = generation()
local entry = gen .. 'k:' .. ARGV[2]
local previous = redis.call('PEXPIRETIME', entry)
if previous == -2 then
  return 0
end
redis.call('UNLINK', entry)
redis.call('DECR', gen .. 'n')
if previous >= 0 then
  bucket_add(gen, previous, -1)
end
return 1
"#;

/// Returns the number of live entries of the current generation.
const LUA_LEN: &str = r#"
local gen = generation()
fold(gen, nil)
local n = tonumber(redis.call('GET', gen .. 'n') or '0')
if n < 0 then
  n = 0
end
return n
"#;

/// `ARGV[2]`: the generation built. Makes it current, unless its build lease
/// lapsed (another replacement may have swept it), and returns the displaced
/// generation, which it lists in `gens` for deletion.
const LUA_FLIP: &str = r#"
local built = ARGV[2]
local gens = ARGV[1] .. 'gens'
if redis.call('EXISTS', ARGV[1] .. 'g' .. built .. ':lease') == 0 then
  return redis.error_reply('generation ' .. built .. ' was abandoned: its build took longer than the lease')
end
local displaced = redis.call('GET', KEYS[1]) or '0'
redis.call('SET', KEYS[1], built)
redis.call('DEL', ARGV[1] .. 'g' .. built .. ':lease')
redis.call('SREM', gens, built)
redis.call('SADD', gens, displaced)
return displaced
"#;

/// The cache in a Redis server.
///
/// Cloning is cheap; clones share the connection.
#[derive(Clone)]
pub struct RedisCache {
    conn: ConnectionManager,
    /// The server's URL without credentials, for messages.
    url: String,
    read: Script,
    set: Script,
    delete: Script,
    len: Script,
    flip: Script,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache")
            .field("url", &self.url)
            .finish()
    }
}

impl RedisCache {
    /// Connects to the Redis server at `url` (e.g. `redis://127.0.0.1:6379/0`)
    /// and checks that it answers and is recent enough (7.0, for `PEXPIRETIME`).
    pub async fn connect(url: &str) -> Result<Self, CacheError> {
        let shown = redact(url);
        let client = Client::open(url).map_err(|e| {
            CacheError::Backend(format!(
                "invalid Redis URL `{shown}`: {e}; use redis://[:password@]host:port[/db]"
            ))
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| {
                CacheError::Backend(format!(
                    "cannot connect to Redis at {shown}: {e}; check that Redis is running there \
                     and that cache.redis_url is right"
                ))
            })?;
        let script = |body: &str| Script::new(&format!("{LUA_COMMON}{body}"));
        let cache = RedisCache {
            conn,
            url: shown,
            read: script(LUA_READ),
            set: script(LUA_SET),
            delete: script(LUA_DELETE),
            len: script(LUA_LEN),
            flip: script(LUA_FLIP),
        };
        cache.check_version().await?;
        Ok(cache)
    }

    /// Refuses servers older than 7.0 up front, rather than failing on the
    /// first write with an unknown-command error.
    async fn check_version(&self) -> Result<(), CacheError> {
        let info: String = ::redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.error("INFO server", e))?;
        let version = info
            .lines()
            .find_map(|line| line.strip_prefix("redis_version:"))
            .unwrap_or("")
            .trim();
        let major: u32 = version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        if major < 7 {
            return Err(CacheError::Backend(format!(
                "Redis at {} is version `{version}`; sift needs Redis 7.0 or newer",
                self.url
            )));
        }
        Ok(())
    }

    fn error(&self, what: &str, e: RedisError) -> CacheError {
        let hint = if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
            "; check that Redis is running and reachable (the client reconnects by itself)"
        } else {
            ""
        };
        CacheError::Backend(format!("Redis at {}: {what} failed: {e}{hint}", self.url))
    }

    /// Deletes every key of `generation`, then takes it off `gens`; until
    /// then a failure half-way leaves it listed for the next sweep.
    async fn delete_generation(&self, prefix: &str, generation: &str) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        let pattern = format!("{prefix}g{generation}:*");
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.error(&format!("SCAN {pattern}"), e))?;
            if !keys.is_empty() {
                ::redis::cmd("UNLINK")
                    .arg(&keys)
                    .exec_async(&mut conn)
                    .await
                    .map_err(|e| self.error(&format!("UNLINK of {pattern}"), e))?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        ::redis::cmd("SREM")
            .arg(format!("{prefix}gens"))
            .arg(generation)
            .exec_async(&mut conn)
            .await
            .map_err(|e| self.error("SREM of a deleted generation", e))
    }

    /// Deletes generations left behind by replacements that crashed or failed
    /// half-way: listed in `gens`, with no live build lease.
    async fn sweep(&self, prefix: &str) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        let listed: Vec<String> = ::redis::cmd("SMEMBERS")
            .arg(format!("{prefix}gens"))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.error("SMEMBERS of leftover generations", e))?;
        for generation in listed {
            let building: bool = ::redis::cmd("EXISTS")
                .arg(format!("{prefix}g{generation}:lease"))
                .query_async(&mut conn)
                .await
                .map_err(|e| self.error("EXISTS of a build lease", e))?;
            if !building {
                tracing::debug!(prefix, generation, "deleting a leftover cache generation");
                self.delete_generation(prefix, &generation).await?;
            }
        }
        Ok(())
    }

    /// Writes `entries` into `generation` in pipelined chunks, renewing
    /// its build lease with each.
    async fn build(
        &self,
        prefix: &str,
        generation: u64,
        entries: &[(&str, &Bytes)],
        ttl: Option<Duration>,
    ) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        let gen = format!("{prefix}g{generation}:");
        let lease = format!("{gen}lease");
        let lease_ms = duration_ms(BUILD_LEASE);
        // The TTL counts from the start of the replacement, on Redis's clock, so
        // every entry of the generation expires at the same moment.
        let expires_ms = match ttl {
            Some(ttl) => {
                let (secs, micros): (u64, u64) = ::redis::cmd("TIME")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.error("TIME", e))?;
                Some(secs * 1000 + micros / 1000 + duration_ms(ttl))
            }
            None => None,
        };
        let mut start = 0;
        while start < entries.len() {
            let mut pipe = ::redis::pipe();
            pipe.cmd("PEXPIRE").arg(&lease).arg(lease_ms).ignore();
            let mut bytes = 0;
            let mut end = start;
            while end < entries.len()
                && end - start < CHUNK_ENTRIES
                && (end == start || bytes < CHUNK_BYTES)
            {
                let (key, value) = entries[end];
                let set = pipe
                    .cmd("SET")
                    .arg(format!("{gen}k:{key}"))
                    .arg(value.as_ref());
                if let Some(at) = expires_ms {
                    set.arg("PXAT").arg(at);
                }
                set.ignore();
                bytes += key.len() + value.len();
                end += 1;
            }
            pipe.exec_async(&mut conn)
                .await
                .map_err(|e| self.error("writing a chunk of the new generation", e))?;
            start = end;
        }
        let mut pipe = ::redis::pipe();
        pipe.cmd("SET")
            .arg(format!("{gen}n"))
            .arg(entries.len())
            .ignore();
        if let (Some(at), false) = (expires_ms, entries.is_empty()) {
            let second = at / 1000 + 1;
            pipe.cmd("HSET")
                .arg(format!("{gen}xc"))
                .arg(second)
                .arg(entries.len())
                .ignore();
            pipe.cmd("ZADD")
                .arg(format!("{gen}xs"))
                .arg(second)
                .arg(second)
                .ignore();
        }
        pipe.exec_async(&mut conn)
            .await
            .map_err(|e| self.error("writing the new generation's count", e))
    }
}

#[async_trait]
impl Cache for RedisCache {
    async fn get(&self, namespace: &str, key: &str) -> Result<Option<Bytes>, CacheError> {
        let mut values = self.mget(namespace, &[key.to_owned()]).await?;
        Ok(values.pop().flatten())
    }

    async fn mget(
        &self,
        namespace: &str,
        keys: &[String],
    ) -> Result<Vec<Option<Bytes>>, CacheError> {
        validate_namespace(namespace)?;
        keys.iter().try_for_each(|key| validate_key(key))?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let prefix = prefix(namespace);
        let values: Vec<Option<Vec<u8>>> = self
            .read
            .key(format!("{prefix}ptr"))
            .arg(&prefix)
            .arg(keys)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.error(&format!("reading from namespace `{namespace}`"), e))?;
        if values.len() != keys.len() {
            return Err(CacheError::Backend(format!(
                "Redis at {}: asked for {} keys, got {} values",
                self.url,
                keys.len(),
                values.len()
            )));
        }
        Ok(values.into_iter().map(|v| v.map(Bytes::from)).collect())
    }

    async fn set(
        &self,
        namespace: &str,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<(), CacheError> {
        validate_namespace(namespace)?;
        validate_key(key)?;
        let prefix = prefix(namespace);
        // A TTL below a millisecond still expires; 0 would mean "none".
        let ttl_ms = ttl.map_or(0, |t| duration_ms(t).max(1));
        let _: i64 = self
            .set
            .key(format!("{prefix}ptr"))
            .arg(&prefix)
            .arg(key)
            .arg(value.as_ref())
            .arg(ttl_ms)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.error(&format!("writing to namespace `{namespace}`"), e))?;
        Ok(())
    }

    async fn delete(&self, namespace: &str, key: &str) -> Result<bool, CacheError> {
        validate_namespace(namespace)?;
        validate_key(key)?;
        let prefix = prefix(namespace);
        let deleted: i64 = self
            .delete
            .key(format!("{prefix}ptr"))
            .arg(&prefix)
            .arg(key)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.error(&format!("deleting from namespace `{namespace}`"), e))?;
        Ok(deleted == 1)
    }

    async fn replace_namespace(
        &self,
        namespace: &str,
        entries: Vec<(String, Bytes)>,
        ttl: Option<Duration>,
    ) -> Result<(), CacheError> {
        validate_namespace(namespace)?;
        entries.iter().try_for_each(|(key, _)| validate_key(key))?;
        let prefix = prefix(namespace);
        // A key given twice keeps its last value, as successive sets would.
        let mut last: HashMap<&str, &Bytes> = HashMap::with_capacity(entries.len());
        for (key, value) in &entries {
            last.insert(key.as_str(), value);
        }
        let unique: Vec<(&str, &Bytes)> = last.into_iter().collect();

        let mut conn = self.conn.clone();
        let generation: u64 = ::redis::cmd("INCR")
            .arg(format!("{prefix}seq"))
            .query_async(&mut conn)
            .await
            .map_err(|e| self.error("INCR of the generation counter", e))?;
        // Lease first, then the listing: a listed generation without a lease
        // is fair game for the sweep.
        ::redis::pipe()
            .cmd("SET")
            .arg(format!("{prefix}g{generation}:lease"))
            .arg(1)
            .arg("PX")
            .arg(duration_ms(BUILD_LEASE))
            .ignore()
            .cmd("SADD")
            .arg(format!("{prefix}gens"))
            .arg(generation)
            .ignore()
            .exec_async(&mut conn)
            .await
            .map_err(|e| self.error("registering a new generation", e))?;

        self.build(&prefix, generation, &unique, ttl).await?;

        let displaced: String = self
            .flip
            .key(format!("{prefix}ptr"))
            .arg(&prefix)
            .arg(generation)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.error(&format!("switching namespace `{namespace}`"), e))?;
        // The replacement is visible from here on; what follows is cleanup,
        // which the next replacement's sweep redoes if it fails now.
        self.delete_generation(&prefix, &displaced).await?;
        self.sweep(&prefix).await
    }

    async fn len(&self, namespace: &str) -> Result<u64, CacheError> {
        validate_namespace(namespace)?;
        let prefix = prefix(namespace);
        let n: u64 = self
            .len
            .key(format!("{prefix}ptr"))
            .arg(&prefix)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.error(&format!("counting namespace `{namespace}`"), e))?;
        Ok(n)
    }
}

/// The prefix of every key of `namespace`, with the namespace as hash tag.
/// Valid namespaces hold no braces and no glob characters.
fn prefix(namespace: &str) -> String {
    format!("sift:{{{namespace}}}:")
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `url` without its password, for messages and logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials() {
        assert_eq!(
            redact("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(
            redact("redis://user:secret@cache:6379"),
            "redis://***@cache:6379"
        );
        assert_eq!(redact("rediss://:secret@cache"), "rediss://***@cache");
    }

    #[test]
    fn namespace_is_the_hash_tag() {
        assert_eq!(prefix("profiles"), "sift:{profiles}:");
    }
}
