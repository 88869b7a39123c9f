//! The Redis chat log: per chat, a hash `chatmeta:{id}` (`seq`: the latest `seq`; `limit`: the
//! end of the block reserved in the store; `open`: the `seq` of the open answer's
//! `message_stream_started`) and a stream `chatlog:{id}` with one entry per publish batch, its
//! id the batch's first `seq` (fields `t`: time, `n`: events, `f`: the frames, one per line).
//! One entry per batch rather than per event, and the frames without their `seq`s (readers
//! write them in from the batch's first `seq`): the script does the same few commands whatever
//! the batch holds. Per event (an `XADD` each, `seq` written into each frame in Lua) it took
//! 80 µs of Redis time for 13 events (`redis-benchmark` on this machine); per batch, see
//! `docs/architecture.md`.
//!
//! One script per publish batch gives the events their `seq`s, appends them, trims the log and
//! publishes the batch on the chat's channel: one round trip, atomic, so the log and the live
//! feed never disagree. A batch is trimmed once all its events are beyond the last
//! `log_events` *and* it is older than `log_secs`; the whole log expires `log_idle_secs` after the chat's last event
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
use crate::protocol::{AnswerMark, Job, ServerEvent, with_seq};

/// The append function shared by the publish and the enqueue scripts. KEYS: meta, log, channel,
/// fence. ARGV: fence as `attempt:batch` (or ''), now (ms), keep events, keep ms, idle ms, stamp
/// line, the batch's answer mark (`o<i>`: event i opens an answer, `c`: the batch closes it, ''),
/// then from ARGV[first]: the number of events and the batch's frames, one per line, without
/// their `seq`s. Returns the last `seq`, 0 when the attempt published this batch already, -1 when
/// fenced, -2 when a block is needed. Constant work per batch: the `seq`s are the entry id and
/// the stamp's, and readers write them into the frames.
const APPEND_LUA: &str = r#"
local function append(first, maintain)
  local n = tonumber(ARGV[first] or '0')
  if n < 1 then return 0 end
  local attempt, batch
  if ARGV[1] ~= '' then
    attempt, batch = string.match(ARGV[1], '^(%d+):(%d+)$')
    attempt, batch = tonumber(attempt), tonumber(batch)
    local held = redis.call('GET', KEYS[4]) or '0:0'
    local a, b = string.match(held, '^(%d+):(%d+)$')
    a, b = tonumber(a), tonumber(b)
    if a > attempt then return -1 end
    if a == attempt and b >= batch then return 0 end
  end
  local state = redis.call('HMGET', KEYS[1], 'seq', 'limit')
  if not state[1] then return -2 end
  local seq, limit = tonumber(state[1]), tonumber(state[2])
  if seq + n > limit then return -2 end
  if attempt then redis.call('SET', KEYS[4], ARGV[1], 'EX', 86400) end
  local now = tonumber(ARGV[2])
  local from = seq + 1
  seq = seq + n
  local id = string.format('%d', from)
  redis.call('XADD', KEYS[2], id .. '-0', 't', ARGV[2], 'n', n, 'f', ARGV[first + 1])
  local mark = ARGV[7]
  if string.sub(mark, 1, 1) == 'o' then
    redis.call('HSET', KEYS[1], 'seq', seq, 'open', from + tonumber(string.sub(mark, 2)))
  else
    redis.call('HSET', KEYS[1], 'seq', seq)
    if mark == 'c' then redis.call('HDEL', KEYS[1], 'open') end
  end
  -- Expiry and trimming once per answer (and per message), not per batch of tokens: a
  -- log may hold one answer more than its bounds for the time the answer streams.
  if maintain or mark ~= '' then
    redis.call('EXPIRE', KEYS[1], 604800)
    redis.call('PEXPIRE', KEYS[2], ARGV[5])
    local keep_from = seq - tonumber(ARGV[3])
    while true do
      local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
      if not oldest then break end
      local start = tonumber(string.match(oldest[1], '^%d+'))
      if start + tonumber(oldest[2][4]) - 1 > keep_from then break end
      if tonumber(oldest[2][2]) > now - tonumber(ARGV[4]) then break end
      redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d', start + 1))
    end
  end
  redis.call('PUBLISH', KEYS[3], ARGV[6] .. ' ' .. id .. '\n' .. ARGV[first + 1])
  return seq
end
"#;

/// The publish script: [`APPEND_LUA`] with the count and frames from ARGV[8].
pub(super) fn publish_script() -> Script {
    Script::new(&format!("{APPEND_LUA} return append(8, false)"))
}

/// The enqueue script: appends the announcement (count and frames from ARGV[10]) as [`publish_script`]
/// does, then queues the job (ARGV[8], its chat ARGV[9]) with the chat's next job number and
/// adds that number to the chat's outstanding jobs. Extra KEYS: the chat's job counter, the job
/// stream, the message's `queued` marker, the chat's outstanding jobs.
pub(super) fn enqueue_script() -> Script {
    Script::new(&format!(
        "{APPEND_LUA} local r = append(10, true) if r < 0 then return r end \
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

/// Reads the latest `seq` ('' when unknown), then, for up to ARGV[2] batches from the one
/// holding `seq` ARGV[1] on, each batch's first `seq` and its frames. KEYS: meta, log.
pub(super) fn read_script() -> Script {
    Script::new(
        "local out = {redis.call('HGET', KEYS[1], 'seq') or ''} \
         local from = ARGV[1] \
         local holding = redis.call('XREVRANGE', KEYS[2], ARGV[1], '-', 'COUNT', 1)[1] \
         if holding then from = holding[1] end \
         for _, e in ipairs(redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', ARGV[2])) do \
           out[#out + 1] = string.match(e[1], '^%d+') out[#out + 1] = e[2][6] end return out",
    )
}

/// The events of a batch whose first `seq` is `first`: each frame (a line) with its `seq`.
pub(super) fn sequence(first: u64, frames: &[u8]) -> impl Iterator<Item = Sequenced> + '_ {
    frames
        .split(|b| *b == b'\n')
        .filter_map(|line| std::str::from_utf8(line).ok())
        .zip(first..)
        .map(|(frame, seq)| Sequenced {
            seq,
            frame: with_seq(frame, seq),
        })
}

/// What a job adds to the enqueue script.
pub(super) struct Enqueue<'a> {
    pub(super) job: &'a Job,
    pub(super) payload: String,
}

/// The batch's effect on the chat's open answer, as the append script takes it: `o<i>` when
/// event `i` opens an answer that the batch leaves open, `c` when the batch closes it.
fn batch_mark(events: &[ServerEvent]) -> String {
    let last = events
        .iter()
        .enumerate()
        .rev()
        .find(|(_, e)| e.answer_mark() != AnswerMark::Neither);
    match last {
        Some((i, e)) if e.answer_mark() == AnswerMark::Opens => format!("o{i}"),
        Some(_) => "c".to_owned(),
        None => String::new(),
    }
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
        let mark = batch_mark(events);
        // Frames are JSON, which never holds a raw newline: one line each.
        let mut frames = String::new();
        for (i, e) in events.iter().enumerate() {
            if i > 0 {
                frames.push('\n');
            }
            frames.push_str(&e.to_frame());
        }
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
                .arg(&mark);
            if let Some(e) = &enqueue {
                call.key(self.key(&format!("chatseq:{}", e.job.chat_id)))
                    .key(self.key("jobs"))
                    .key(self.queued_key(&e.job.message_id))
                    .key(self.key(&format!("chatjobs:{}", e.job.chat_id)))
                    .arg(&e.payload)
                    .arg(e.job.chat_id.to_string());
            }
            call.arg(events.len()).arg(&frames);
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
        let mut events = Vec::new();
        while let (Some(first), Some(frames)) = (reply.next(), reply.next()) {
            let first: u64 = std::str::from_utf8(&first)
                .ok()
                .and_then(|f| f.parse().ok())
                .unwrap_or(0);
            events.extend(sequence(first, &frames).filter(|e| e.seq > after));
            if events.len() >= limit {
                break;
            }
        }
        events.truncate(limit);
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
