//! The Redis chat log: per chat, a hash `chatmeta:{id}` (`seq`: the latest `seq`; `limit`: the
//! end of the block reserved in the store; `open`: the `seq` of the open answer's
//! `message_stream_started`, 0 when none; `fk`/`fb`: the last fenced publisher and its batch;
//! `low`/`lowt`: the oldest batch kept and its time) and a stream `chatlog:{id}` with one entry
//! per publish batch, its id the batch's first `seq` (fields `t`: time, `n`: events, `f`: the
//! frames, one per line). One entry per batch rather than per event, and the frames without
//! their `seq`s (readers write them in from the batch's first `seq`): the script does the same
//! few commands whatever the batch holds. Per event (an `XADD` each, `seq` written into each
//! frame in Lua) it took 80 µs of Redis time for 13 events; per batch, fenced per message key,
//! 23 µs for 17 tokens; as now, with token templates ([`super::batch`]), about 11 µs
//! (`INFO commandstats`, no other load).
//!
//! One script per publish batch gives the events their `seq`s, appends them, trims the log and
//! publishes the batch on the chat's channel: one round trip, atomic, so the log and the live
//! feed never disagree. A batch is trimmed once all its events are beyond the last
//! `log_events` *and* it is older than `log_secs`; the whole log expires `log_idle_secs` after
//! the chat's last event (the meta hash lives a week, so a resume at the latest `seq` still
//! works after that). The same script fences job attempts: `fence:{message_id}` holds the
//! newest attempt that published; an older attempt's publish is refused, and a batch repeated
//! after a lost reply is not appended twice.
//!
//! The script answers `-2` when the chat has no meta (a new chat, or Redis lost its data) or its
//! block is used up; the broker then reserves a block in the store and sets it with
//! `INIT_SCRIPT` before trying again.

use async_trait::async_trait;
use redis::Script;
use uuid::Uuid;

use super::batch::decode;
use super::{RedisBroker, STAMP, unavailable};
use crate::broker::{
    BrokerError, ChatLog, Deletion, Head, PublishOptions, Read, Subscription, seqs,
};
use crate::protocol::{AnswerMark, Job, ServerEvent};

/// The append function shared by the publish and the enqueue scripts. KEYS: meta, log, channel,
/// fence. ARGV: the fence as `message_id:attempt` (or ''), the attempt's batch number, the
/// attempt, now (ms), keep events, keep ms, idle ms, stamp line, the batch's answer mark (`o<i>`:
/// event i opens an answer, `c`: the batch closes it, ''), then from ARGV[first]: the number of
/// events and the batch's frames, one per line, without their `seq`s. Returns the last `seq`, 0
/// when the attempt published this batch already, -1 when fenced, -2 when a block is needed.
///
/// Constant work per batch, and as few commands as the common case allows (every `redis.call`
/// costs, and each string a script touches is hashed whole by Redis's Lua):
/// - The `seq`s are the entry id and the stamp's; readers write them into the frames.
/// - The meta remembers the last fenced publisher (`fk`) and its batch (`fb`): while the same
///   attempt goes on publishing, nobody else did, so its fence key (`fence:{message_id}`, the
///   newest attempt) is read and raised only on an attempt's first batch here.
/// - The meta remembers the oldest batch kept (`low`, `lowt`), so the log is read for trimming
///   only once its oldest batch may be beyond both bounds.
const APPEND_LUA: &str = r#"
local function append(first, maintain)
  local n = tonumber(ARGV[first] or '0')
  if n < 1 then return 0 end
  local state = redis.call('HMGET', KEYS[1], 'seq', 'limit', 'fk', 'fb', 'low', 'lowt')
  if not state[1] then return -2 end
  local seq = tonumber(state[1])
  if seq + n > tonumber(state[2]) then return -2 end
  local fenced = ARGV[1] ~= ''
  if fenced then
    if state[3] == ARGV[1] then
      if tonumber(state[4]) >= tonumber(ARGV[2]) then return 0 end
    else
      local held = tonumber(redis.call('GET', KEYS[4]) or '0')
      local attempt = tonumber(ARGV[3])
      if held > attempt then return -1 end
      if held < attempt then redis.call('SET', KEYS[4], ARGV[3], 'EX', 86400) end
    end
  end
  local now = ARGV[4]
  local from = seq + 1
  seq = seq + n
  local id = string.format('%d', from)
  redis.call('XADD', KEYS[2], id .. '-0', 't', now, 'n', n, 'f', ARGV[first + 1])
  local set = {'seq', seq}
  if fenced then
    set[#set + 1] = 'fk'; set[#set + 1] = ARGV[1]; set[#set + 1] = 'fb'; set[#set + 1] = ARGV[2]
  end
  if not state[5] then
    set[#set + 1] = 'low'; set[#set + 1] = from; set[#set + 1] = 'lowt'; set[#set + 1] = now
  end
  local mark = ARGV[9]
  if mark == 'c' then
    set[#set + 1] = 'open'; set[#set + 1] = 0
  elseif mark ~= '' then
    set[#set + 1] = 'open'; set[#set + 1] = from + tonumber(string.sub(mark, 2))
  end
  redis.call('HSET', KEYS[1], unpack(set))
  -- Expiry and trimming once per message (enqueue) and once per answer (its end), not per
  -- batch of tokens: a log may hold one answer more than its bounds while the answer streams.
  if maintain or mark == 'c' then
    redis.call('EXPIRE', KEYS[1], 604800)
    redis.call('PEXPIRE', KEYS[2], ARGV[7])
    local keep_from = seq - tonumber(ARGV[5])
    local young = tonumber(now) - tonumber(ARGV[6])
    if state[5] and tonumber(state[5]) <= keep_from and tonumber(state[6]) <= young then
      while true do
        local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
        if not oldest then redis.call('HDEL', KEYS[1], 'low', 'lowt') break end
        local start = tonumber(string.match(oldest[1], '^%d+'))
        if start + tonumber(oldest[2][4]) - 1 > keep_from or tonumber(oldest[2][2]) > young then
          redis.call('HSET', KEYS[1], 'low', start, 'lowt', oldest[2][2])
          break
        end
        redis.call('XTRIM', KEYS[2], 'MINID', string.format('%d', start + 1))
      end
    end
  end
  redis.call('PUBLISH', KEYS[3], ARGV[8] .. ' ' .. id .. '\n' .. ARGV[first + 1])
  return seq
end
"#;

/// The publish script: [`APPEND_LUA`] with the count and frames from ARGV[10].
pub(super) fn publish_script() -> Script {
    Script::new(&format!("{APPEND_LUA} return append(10, false)"))
}

/// The enqueue script: appends the announcement (count and frames from ARGV[12]) as [`publish_script`]
/// does, then queues the job (ARGV[10], its chat ARGV[11]) with the chat's next job number and
/// adds that number to the chat's outstanding jobs. Extra KEYS: the chat's job counter, the job
/// stream, the message's `queued` marker, the chat's outstanding jobs, the tenant's backlog
/// (the `queued` markers of its waiting messages, by time).
pub(super) fn enqueue_script() -> Script {
    Script::new(&format!(
        "{APPEND_LUA} local r = append(12, true) if r < 0 then return r end \
         local n = redis.call('INCR', KEYS[5]) redis.call('EXPIRE', KEYS[5], 604800) \
         redis.call('XADD', KEYS[6], '*', 'job', ARGV[10], 'seq', n, 'chat', ARGV[11]) \
         redis.call('ZADD', KEYS[8], n, n) redis.call('EXPIRE', KEYS[8], 604800) \
         redis.call('ZADD', KEYS[9], ARGV[4], KEYS[7]) redis.call('EXPIRE', KEYS[9], 86400) \
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
        let frames = super::batch::encode(events);
        let fence = options.fence.map(|f| {
            (
                self.key(&format!("fence:{}", f.message_id)),
                format!("{}:{}", f.message_id, f.attempt),
                f,
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
                );
            match &fence {
                Some((_, holder, f)) => call.arg(holder).arg(f.batch).arg(f.attempt),
                None => call.arg("").arg(0).arg(0),
            };
            call.arg(chrono::Utc::now().timestamp_millis())
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
                    .key(self.backlog_key(e.job.tenant_id))
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
                        attempt: fence.map_or(0, |f| f.2.attempt),
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
        self.set_block(chat_id, block).await
    }

    /// Hands a reserved block to Redis ([`init_script`]).
    async fn set_block(&self, chat_id: Uuid, block: seqs::Block) -> Result<(), BrokerError> {
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
            events.extend(decode(first, &frames).into_iter().filter(|e| e.seq > after));
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
                    // 0: the last answer closed (one field write instead of a delete).
                    open_answer: open.filter(|o| *o > 0),
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

    async fn adopt(&self, chat_id: Uuid, block: seqs::Block) -> Result<(), BrokerError> {
        self.set_block(chat_id, block).await
    }

    async fn forget(&self, chat_id: Uuid) -> Result<(), BrokerError> {
        let _: () = redis::pipe()
            .del(self.meta_key(chat_id))
            .ignore()
            .del(self.log_key(chat_id))
            .ignore()
            .publish(self.key(super::DELETED_CHANNEL), chat_id.to_string())
            .ignore()
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn deletions(&self) -> tokio::sync::broadcast::Receiver<Deletion> {
        self.deletions.subscribe()
    }
}
