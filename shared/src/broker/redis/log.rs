//! The Redis chat log: per chat, a hash `chatmeta:{id}` (`seq`: the latest `seq`; `limit`: the
//! end of the block reserved in the store; `open`: the `seq` of the open answer's
//! `message_stream_started`) and a stream `chatlog:{id}` whose entry ids are the `seq`s.
//!
//! One script per publish batch gives the events their `seq`s, appends them, trims the log and
//! publishes the batch on the chat's channel: one round trip, atomic, so the log and the live
//! feed never disagree. An event is trimmed once it is beyond the last `log_events` *and*
//! older than `log_secs`; the whole log expires `log_idle_secs` after the chat's last event
//! (the meta hash lives a week, so a resume at the latest `seq` still works after that).
//! The same script fences job attempts: `fence:{message_id}` holds the newest attempt that
//! published and its last batch number; an older attempt's publish is refused, and a batch
//! repeated after a lost reply is not appended twice.
//!
//! The script answers `-2` when the chat has no meta (a new chat, or Redis lost its data) or its
//! block is used up; the broker then reserves a block in the store and sets it with
//! `INIT_SCRIPT` before trying again.

use async_trait::async_trait;
use redis::Script;
use uuid::Uuid;

use super::{RedisBroker, STAMP, unavailable};
use crate::broker::{
    BrokerError, ChatLog, Head, PublishOptions, Read, Sequenced, Subscription, seqs,
};
use crate::protocol::{AnswerMark, Job, ServerEvent, frame_seq};

/// The append function shared by the publish and the enqueue scripts. KEYS: meta, log, channel,
/// fence. ARGV: fence as `attempt:batch` (or ''), now (ms), keep events, keep ms, idle ms, stamp line,
/// marks (one letter per event: `o` opens an answer, `c` closes it, `-` neither), then the
/// frames from ARGV[first] on. Returns the last `seq`, 0 when the attempt published this batch
/// already, -1 when fenced, -2 when a block is needed.
const APPEND_LUA: &str = r#"
local function append(first)
  local n = #ARGV - first + 1
  if n < 1 then return 0 end
  local attempt, batch
  if ARGV[1] ~= '' then
    attempt, batch = string.match(ARGV[1], '^(%d+):(%d+)$')
    attempt, batch = tonumber(attempt), tonumber(batch)
    local held = redis.call('HMGET', KEYS[4], 'a', 'b')
    local a, b = tonumber(held[1] or '0'), tonumber(held[2] or '0')
    if a > attempt then return -1 end
    if a == attempt and b >= batch then return 0 end
  end
  local state = redis.call('HMGET', KEYS[1], 'seq', 'limit')
  if not state[1] then return -2 end
  local seq, limit = tonumber(state[1]), tonumber(state[2])
  if seq + n > limit then return -2 end
  if attempt then
    redis.call('HSET', KEYS[4], 'a', attempt, 'b', batch)
    redis.call('EXPIRE', KEYS[4], 86400)
  end
  local now = tonumber(ARGV[2])
  local out = {ARGV[6]}
  for i = first, #ARGV do
    seq = seq + 1
    local frame = string.sub(ARGV[i], 1, -2) .. ',"seq":' .. string.format('%d', seq) .. '}'
    redis.call('XADD', KEYS[2], string.format('%d', seq) .. '-0', 't', ARGV[2], 'f', frame)
    out[#out + 1] = frame
    local mark = string.sub(ARGV[7], i - first + 1, i - first + 1)
    if mark == 'o' then redis.call('HSET', KEYS[1], 'open', seq)
    elseif mark == 'c' then redis.call('HDEL', KEYS[1], 'open') end
  end
  redis.call('HSET', KEYS[1], 'seq', seq)
  redis.call('EXPIRE', KEYS[1], 604800)
  local excess = redis.call('XLEN', KEYS[2]) - tonumber(ARGV[3])
  while excess > 0 do
    local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
    if tonumber(oldest[2][2]) > now - tonumber(ARGV[4]) then break end
    redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d', tonumber(string.match(oldest[1], '^%d+')) + 1))
    excess = excess - 1
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  redis.call('PUBLISH', KEYS[3], table.concat(out, '\n'))
  return seq
end
"#;

/// The publish script: [`APPEND_LUA`] with the frames from ARGV[8].
pub(super) fn publish_script() -> Script {
    Script::new(&format!("{APPEND_LUA} return append(8)"))
}

/// The enqueue script: appends the announcement (frames from ARGV[10]) as [`publish_script`]
/// does, then queues the job (ARGV[8], its chat ARGV[9]) with the chat's next job number and
/// adds that number to the chat's outstanding jobs. Extra KEYS: the chat's job counter, the job
/// stream, the message's `queued` marker, the chat's outstanding jobs.
pub(super) fn enqueue_script() -> Script {
    Script::new(&format!(
        "{APPEND_LUA} local r = append(10) if r < 0 then return r end \
         local n = redis.call('INCR', KEYS[5]) redis.call('EXPIRE', KEYS[5], 604800) \
         redis.call('XADD', KEYS[6], '*', 'job', ARGV[8], 'seq', n, 'chat', ARGV[9]) \
         redis.call('ZADD', KEYS[8], n, n) redis.call('EXPIRE', KEYS[8], 604800) \
         redis.call('SET', KEYS[7], 1, 'EX', 86400) return r"
    ))
}

/// Sets a reserved block: a chat without meta starts at the block's start; one with meta only
/// raises its limit. KEYS: meta. ARGV: start, limit.
pub(super) fn init_script() -> Script {
    Script::new(
        "if redis.call('HEXISTS', KEYS[1], 'seq') == 0 then \
           redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'limit', ARGV[2]) \
         elseif tonumber(ARGV[2]) > tonumber(redis.call('HGET', KEYS[1], 'limit') or '0') then \
           redis.call('HSET', KEYS[1], 'limit', ARGV[2]) end \
         redis.call('EXPIRE', KEYS[1], 604800) return 1",
    )
}

/// Reads the latest `seq` ('' when unknown) and up to ARGV[2] frames from id ARGV[1] on.
/// KEYS: meta, log.
pub(super) fn read_script() -> Script {
    Script::new(
        "local out = {redis.call('HGET', KEYS[1], 'seq') or ''} \
         for _, e in ipairs(redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2])) do \
           out[#out + 1] = e[2][4] end return out",
    )
}

/// What a job adds to the enqueue script.
pub(super) struct Enqueue<'a> {
    pub(super) job: &'a Job,
    pub(super) payload: String,
}

impl RedisBroker {
    pub(super) fn meta_key(&self, chat_id: Uuid) -> String {
        self.key(&format!("chatmeta:{chat_id}"))
    }

    fn log_key(&self, chat_id: Uuid) -> String {
        self.key(&format!("chatlog:{chat_id}"))
    }

    /// Runs the publish script (or, with `enqueue`, the enqueue script), reserving a block in
    /// the store when the chat needs one.
    pub(super) async fn append(
        &self,
        chat_id: Uuid,
        events: &[ServerEvent],
        options: PublishOptions<'_>,
        enqueue: Option<Enqueue<'_>>,
    ) -> Result<u64, BrokerError> {
        let mut stamp = format!("{STAMP}{}", chrono::Utc::now().timestamp_micros());
        if let Some(trace) = options.first_token_trace {
            stamp.push(' ');
            stamp.push_str(trace);
        }
        let marks: String = events
            .iter()
            .map(|e| match e.answer_mark() {
                AnswerMark::Opens => 'o',
                AnswerMark::Closes => 'c',
                AnswerMark::Neither => '-',
            })
            .collect();
        let frames: Vec<String> = events.iter().map(|e| e.to_frame().to_string()).collect();
        let fence = options.fence.map(|f| {
            (
                self.key(&format!("fence:{}", f.message_id)),
                f.attempt,
                f.batch,
            )
        });
        for _ in 0..3 {
            let script = if enqueue.is_some() {
                &self.scripts.enqueue
            } else {
                &self.scripts.publish
            };
            let mut call = script.prepare_invoke();
            call.key(self.meta_key(chat_id))
                .key(self.log_key(chat_id))
                .key(self.chat_channel(chat_id))
                .key(
                    fence
                        .as_ref()
                        .map_or_else(|| self.key("nofence"), |f| f.0.clone()),
                )
                .arg(
                    fence
                        .as_ref()
                        .map_or_else(String::new, |f| format!("{}:{}", f.1, f.2)),
                )
                .arg(chrono::Utc::now().timestamp_millis())
                .arg(self.log.events)
                .arg(self.log.keep_ms)
                .arg(self.log.idle_ms)
                .arg(&stamp)
                .arg(&marks);
            if let Some(e) = &enqueue {
                call.key(self.key(&format!("chatseq:{}", e.job.chat_id)))
                    .key(self.key("jobs"))
                    .key(self.queued_key(&e.job.message_id))
                    .key(self.key(&format!("chatjobs:{}", e.job.chat_id)))
                    .arg(&e.payload)
                    .arg(e.job.chat_id.to_string());
            }
            call.arg(&frames);
            let answer: i64 = call
                .invoke_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            match answer {
                -1 => {
                    return Err(BrokerError::Fenced {
                        attempt: fence.map_or(0, |f| f.1),
                    });
                }
                -2 => self.reserve(chat_id).await?,
                last => return Ok(u64::try_from(last).unwrap_or(0)),
            }
        }
        Err(BrokerError::Unavailable("could not reserve seqs".into()))
    }

    /// Reserves the chat's next block in the store and hands it to Redis.
    async fn reserve(&self, chat_id: Uuid) -> Result<(), BrokerError> {
        let block = seqs::reserve(self.store.as_ref(), chat_id).await?;
        let _: i64 = self
            .scripts
            .init
            .key(self.meta_key(chat_id))
            .arg(block.start)
            .arg(block.limit)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The latest `seq`s of many chats in one round trip (`None` where Redis has no meta).
    pub(super) async fn latest_seqs(
        &self,
        chats: &[Uuid],
    ) -> Result<Vec<Option<u64>>, BrokerError> {
        let mut pipe = redis::pipe();
        for chat in chats {
            pipe.hget(self.meta_key(*chat), "seq");
        }
        pipe.query_async(&mut self.conn())
            .await
            .map_err(unavailable)
    }
}

#[async_trait]
impl ChatLog for RedisBroker {
    async fn publish(
        &self,
        chat_id: Uuid,
        events: &[ServerEvent],
        options: PublishOptions<'_>,
    ) -> Result<u64, BrokerError> {
        if events.is_empty() {
            return self.head(chat_id).await.map(|h| h.latest);
        }
        self.append(chat_id, events, options, None).await
    }

    async fn read(&self, chat_id: Uuid, after: u64, limit: usize) -> Result<Read, BrokerError> {
        let reply: Vec<Vec<u8>> = self
            .scripts
            .read
            .key(self.meta_key(chat_id))
            .key(self.log_key(chat_id))
            .arg(after + 1)
            .arg(limit.max(1))
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        let mut reply = reply.into_iter();
        let latest = match reply.next().and_then(|h| String::from_utf8(h).ok()) {
            Some(h) if !h.is_empty() => h.parse().unwrap_or(0),
            // Redis lost the chat's meta: its latest `seq` is past every one issued before.
            _ => self.head(chat_id).await?.latest,
        };
        let events: Vec<Sequenced> = reply
            .filter_map(|f| bytestring::ByteString::try_from(f).ok())
            .filter_map(|frame| frame_seq(&frame).map(|seq| Sequenced { seq, frame }))
            .collect();
        let contiguous = match events.first() {
            Some(first) => first.seq == after + 1,
            None => after == latest,
        };
        Ok(if contiguous && after <= latest {
            Read::Events { events, latest }
        } else {
            Read::Unavailable { latest }
        })
    }

    async fn head(&self, chat_id: Uuid) -> Result<Head, BrokerError> {
        for _ in 0..2 {
            let (seq, open): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
                .arg(self.meta_key(chat_id))
                .arg("seq")
                .arg("open")
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            if let Some(latest) = seq {
                return Ok(Head {
                    latest,
                    open_answer: open,
                });
            }
            self.reserve(chat_id).await?;
        }
        Err(BrokerError::Unavailable(
            "chat meta missing after reservation".into(),
        ))
    }

    async fn subscribe(&self, chat_id: Uuid) -> Result<Subscription, BrokerError> {
        self.subscribe_live(chat_id).await
    }
}
