//! The wire protocol: the single definition of what crosses a socket or the broker.
//!
//! Gateway and worker never restate these types; they build and parse them from here.

mod client;
mod errors;
mod events;
mod job;
pub mod text;

pub use client::{ClientFrame, FrameError, parse_client_frame, validate_user_id};
pub use errors::{ErrorCode, ErrorDetails};
pub use events::{
    AnswerMark, Frame, ServerEvent, Usage, frame_event_type, sequenced_frame, with_seq,
};
pub use job::{Job, answer_id, message_id};
