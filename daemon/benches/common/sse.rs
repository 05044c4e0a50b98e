//! A client's view of a streamed answer (server-sent events), for moatd and its peers.
//!
//! The client shares the machine's cores with the server it measures, so it does as little
//! as it can per event: a substring test, and JSON parsing only for the usage event.

use std::io::{BufRead as _, BufReader};
use std::time::{Duration, Instant};

use serde_json::Value;

/// An answer streamed by a server, as the client saw it.
pub struct Streamed {
    pub ttft: Duration,
    pub first_to_last: Duration,
    pub tokens: usize,
}

/// Posts `body` and reads the server-sent events: the first and last events that carry
/// text, and the token count (the usage event's, or one per text event when there is none,
/// as llama-server sends one token per event).
pub fn stream(agent: &ureq::Agent, url: &str, body: &str) -> Streamed {
    let start = Instant::now();
    let response = agent
        .post(url)
        .header("content-type", "application/json")
        .send(body)
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let mut reader = BufReader::with_capacity(64 * 1024, response.into_body().into_reader());
    let (mut first, mut last, mut events, mut usage) = (None, start, 0usize, None);
    let mut line = String::with_capacity(1024);
    loop {
        line.clear();
        if reader.read_line(&mut line).expect("stream reads") == 0 {
            break;
        }
        let Some(data) = line.trim_end().strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        if data.contains("\"usage\":{") {
            let event: Value = serde_json::from_str(data).expect("JSON event");
            usage = event["usage"]["completion_tokens"]
                .as_u64()
                .map(|n| n as usize);
        }
        if data.contains("\"content\":\"") && !data.contains("\"content\":\"\"") {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
            events += 1;
        }
    }
    let first = first.expect("the answer has text");
    Streamed {
        ttft: first - start,
        first_to_last: last - first,
        tokens: usage.unwrap_or(events),
    }
}
