//! Turning a stream of token pieces into text chunks: pieces may split a
//! UTF-8 character, and text that could be the start of a stop string is
//! held back until it is known not to be one.

/// Accumulates token pieces and releases text that is safe to show.
#[derive(Debug, Default)]
pub struct TextStream {
    /// Bytes not yet valid UTF-8 (a character split across pieces).
    pending: Vec<u8>,
    /// Decoded text not yet released (it may begin a stop string).
    held: String,
    stops: Vec<String>,
}

/// What one piece gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Text to send (may be empty).
    Text(String),
    /// A stop string was found: the text before it, and generation ends.
    Stopped(String),
}

impl TextStream {
    /// A stream that ends at the first of `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Self::default()
        }
    }

    /// Adds a token's bytes.
    pub fn push(&mut self, piece: &[u8]) -> Step {
        self.pending.extend_from_slice(piece);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(text) => text.len(),
            // An incomplete character at the end waits for the next piece;
            // invalid bytes in the middle are replaced.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => {
                let text = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                self.held.push_str(&text);
                return self.release();
            }
        };
        let rest = self.pending.split_off(valid);
        let text = String::from_utf8(std::mem::replace(&mut self.pending, rest))
            .expect("checked valid UTF-8");
        self.held.push_str(&text);
        self.release()
    }

    /// Whatever is left at the end of generation.
    pub fn finish(&mut self) -> String {
        let mut text = std::mem::take(&mut self.held);
        text.push_str(&String::from_utf8_lossy(&std::mem::take(&mut self.pending)));
        text
    }

    fn release(&mut self) -> Step {
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min()
        {
            let text = self.held[..at].to_string();
            self.held.clear();
            return Step::Stopped(text);
        }
        // Keep the longest tail that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|stop| longest_prefix_suffix(&self.held, stop))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Step::Text(text)
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(step: Step) -> String {
        match step {
            Step::Text(t) => t,
            Step::Stopped(t) => panic!("stopped early with {t:?}"),
        }
    }

    #[test]
    fn joins_characters_split_across_pieces() {
        let mut stream = TextStream::new(vec![]);
        let euro = "€".as_bytes();
        assert_eq!(text(stream.push(b"5 ")), "5 ");
        assert_eq!(text(stream.push(&euro[..1])), "");
        assert_eq!(text(stream.push(&euro[1..])), "€");
        assert_eq!(stream.finish(), "");
    }

    #[test]
    fn holds_back_a_possible_stop_and_cuts_at_it() {
        let mut stream = TextStream::new(vec!["\n\nUser:".into()]);
        assert_eq!(text(stream.push(b"Paris.")), "Paris.");
        assert_eq!(text(stream.push(b"\n")), "");
        assert_eq!(text(stream.push(b"\nUs")), "");
        assert_eq!(stream.push(b"er: hi"), Step::Stopped(String::new()));
    }

    #[test]
    fn releases_held_text_that_turned_out_not_to_stop() {
        let mut stream = TextStream::new(vec!["END".into()]);
        assert_eq!(text(stream.push(b"the E")), "the ");
        assert_eq!(text(stream.push(b"NV")), "ENV");
        assert_eq!(stream.push(b" EN"), Step::Text(" ".into()));
        assert_eq!(stream.push(b"D."), Step::Stopped(String::new()));
        let mut stream = TextStream::new(vec!["END".into()]);
        assert_eq!(text(stream.push(b"EX")), "EX");
        assert_eq!(text(stream.push(b"E")), "");
        assert_eq!(stream.finish(), "E");
    }
}
