//! Streamed answers: server-sent events carrying OpenAI chunk objects, then `data: [DONE]`.
//!
//! The response starts only once the batcher has admitted the request, so that a request it
//! had no room for still gets a 429 status rather than an error inside a 200 stream.

use std::convert::Infallible;

use axum::response::sse::{Event as Sse, Sse as SseBody};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, StreamExt};
use serde_json::Value;

use super::completions::CancelOnDrop;
use super::respond::engine_error;
use crate::job::engine_error_answer;
use crate::openai::ChunkHead;
use ember_engine::{Completion, EngineError, Event, Ticket};

/// What every chunk of one answer repeats.
pub(super) struct Head {
    pub id: String,
    pub model: String,
    pub created: u64,
    pub chat: bool,
    pub include_usage: bool,
}

impl Head {
    fn chunks(&self) -> ChunkHead<'_> {
        ChunkHead {
            id: &self.id,
            model: &self.model,
            created: self.created,
            chat: self.chat,
            include_usage: self.include_usage,
        }
    }
}

/// A request in flight, followed to its end. Dropping it (the client went away) drops the
/// ticket, which frees the batch slot.
struct Following {
    ticket: Ticket,
    head: Head,
    /// Bytes of the completion's text sent so far.
    sent: usize,
    done: bool,
    _cancel: CancelOnDrop,
}

pub(super) async fn stream_response(
    mut ticket: Ticket,
    head: Head,
    cancel: CancelOnDrop,
    retry_after_s: u64,
) -> Response {
    let mut opening = if head.chat { vec![data(&head.chunks().choice("", true, None))] } else { Vec::new() };
    let mut done = false;
    match ticket.events.recv().await {
        // Text only follows admission, so it cannot come first.
        Some(Event::Admitted | Event::Text(_)) => {}
        // Answered without being admitted: refused, or finished at once (no tokens wanted).
        None => match (&mut ticket.done).await {
            Ok(Err(e)) => return engine_error(&e, retry_after_s),
            Err(_) => return engine_error(&EngineError::Stopped, retry_after_s),
            Ok(Ok(c)) => {
                done = true;
                opening.extend(ending(&head, 0, Ok(c)));
            }
        },
    }
    let following = Following { ticket, head, sent: 0, done, _cancel: cancel };
    let rest = stream::unfold(following, |mut f| async move {
        if f.done {
            return None;
        }
        let events = match f.ticket.events.recv().await {
            Some(Event::Text(piece)) => {
                f.sent += piece.len();
                vec![data(&f.head.chunks().choice(&piece, false, None))]
            }
            Some(Event::Admitted) => Vec::new(),
            None => {
                f.done = true;
                let answer = (&mut f.ticket.done).await.unwrap_or(Err(EngineError::Stopped));
                ending(&f.head, f.sent, answer)
            }
        };
        Some((events, f))
    });
    let events = stream::iter(opening).chain(rest.flat_map(stream::iter)).map(Ok::<_, Infallible>);
    SseBody::new(events).into_response()
}

/// The last chunks: any text held back for stop sequences (after the `sent` bytes already
/// out), the finish reason, the usage when asked for, and `[DONE]`; or the error, as OpenAI
/// sends one mid-stream.
fn ending(head: &Head, sent: usize, answer: Result<Completion, EngineError>) -> Vec<Sse> {
    let chunks = head.chunks();
    let mut events = Vec::new();
    match answer {
        Ok(c) => {
            let rest = c.text.get(sent..).unwrap_or_default();
            if !rest.is_empty() {
                events.push(data(&chunks.choice(rest, false, None)));
            }
            events.push(data(&chunks.choice("", false, Some(c.finish_reason))));
            if head.include_usage {
                events.push(data(&chunks.usage(&c.usage)));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, label = e.label(), "a streamed request failed");
            events.push(data(&engine_error_answer(&e).1));
        }
    }
    events.push(Sse::default().data("[DONE]"));
    events
}

fn data(v: &Value) -> Sse {
    Sse::default().data(v.to_string())
}
