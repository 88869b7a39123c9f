//! Where a chat's `seq`s come from: blocks reserved in the store (Postgres, the source of
//! truth), handed out one by one by the chat log.
//!
//! The store keeps, per chat, the end of the last block reserved; every `seq` ever issued is at
//! or below it. A log that has no state for a chat (a new chat, a restarted process, a Redis that
//! lost its data) reserves a new block and starts after the previous block's end, so a chat's
//! `seq` never goes backwards; after a loss it jumps forward by up to a block. A log that uses up
//! its block reserves the next one: one store write per [`BLOCK`] events of a chat.
//!
//! A chat is created with its first block reserved ([`FIRST`], written by the chat's own
//! `INSERT`), and the gateway that created it hands that block to the log at once
//! ([`super::ChatLog::adopt`]): a new chat's first socket and first message need no store write.
//! Should the hand-over fail, the log reserves the next block when it first needs one, and the
//! chat's `seq`s start after [`BLOCK`] instead of after 0.

use uuid::Uuid;

use super::BrokerError;
use crate::store::Store;

/// `seq`s reserved at a time.
pub const BLOCK: u64 = 100_000;

/// A reserved block: `seq`s `start + 1 ..= limit` may be issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// The end of the previous block (every `seq` issued before is at or below it).
    pub start: u64,
    /// The last `seq` of this block.
    pub limit: u64,
}

/// The block every chat is created with.
pub const FIRST: Block = Block {
    start: 0,
    limit: BLOCK,
};

/// Reserves the chat's next block.
pub async fn reserve(store: &dyn Store, chat_id: Uuid) -> Result<Block, BrokerError> {
    match store.reserve_seq(chat_id, BLOCK).await {
        Ok(Some(limit)) => Ok(Block {
            start: limit.saturating_sub(BLOCK),
            limit,
        }),
        Ok(None) => Err(BrokerError::NoSuchChat(chat_id)),
        Err(e) => Err(BrokerError::Store(e)),
    }
}
