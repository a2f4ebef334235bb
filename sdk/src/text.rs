//! BERT WordPiece tokenisation (uncased), as used by sentence-transformers
//! models such as all-MiniLM-L6-v2.
//!
//! It follows the reference BERT pipeline: clean the text, space out CJK
//! ideographs, split on whitespace, lower-case and strip accents, split
//! off punctuation, then match the longest vocabulary pieces greedily
//! (`##` marks a piece that continues a word).

use std::collections::HashMap;

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// Words longer than this many characters become `[UNK]`, as in BERT.
const MAX_WORD_CHARS: usize = 100;

/// A tokenizer built from a `vocab.txt` (one piece per line, id = line number).
#[derive(Debug, Clone)]
pub struct WordPiece {
    ids: HashMap<String, i64>,
    cls: i64,
    sep: i64,
    unk: i64,
}

/// Token ids and attention mask for one text, special tokens included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    /// Vocabulary ids, starting with `[CLS]` and ending with `[SEP]`.
    pub ids: Vec<i64>,
}

impl WordPiece {
    /// Builds the tokenizer from the text of a `vocab.txt`.
    pub fn from_vocab(vocab: &str) -> Result<Self, String> {
        let ids: HashMap<String, i64> = vocab
            .lines()
            .enumerate()
            .map(|(id, piece)| (piece.to_string(), id as i64))
            .collect();
        let special = |name: &str| {
            ids.get(name)
                .copied()
                .ok_or_else(|| format!("vocabulary has no {name} token"))
        };
        Ok(Self {
            cls: special("[CLS]")?,
            sep: special("[SEP]")?,
            unk: special("[UNK]")?,
            ids,
        })
    }

    /// Tokenises `text` into at most `max_tokens` ids (`[CLS]` and `[SEP]`
    /// included; longer texts are truncated).
    pub fn encode(&self, text: &str, max_tokens: usize) -> Encoding {
        let mut ids = vec![self.cls];
        let budget = max_tokens.saturating_sub(2);
        'words: for word in basic_tokens(text) {
            for id in self.word_pieces(&word) {
                if ids.len() - 1 == budget {
                    break 'words;
                }
                ids.push(id);
            }
        }
        ids.push(self.sep);
        Encoding { ids }
    }

    fn word_pieces(&self, word: &str) -> Vec<i64> {
        let chars: Vec<char> = word.chars().collect();
        if chars.len() > MAX_WORD_CHARS {
            return vec![self.unk];
        }
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < chars.len() {
            let Some((end, id)) = self.longest_piece(&chars, start) else {
                return vec![self.unk];
            };
            pieces.push(id);
            start = end;
        }
        pieces
    }

    fn longest_piece(&self, chars: &[char], start: usize) -> Option<(usize, i64)> {
        (start + 1..=chars.len()).rev().find_map(|end| {
            let mut piece: String = chars[start..end].iter().collect();
            if start > 0 {
                piece.insert_str(0, "##");
            }
            self.ids.get(&piece).map(|&id| (end, id))
        })
    }
}

/// Cleans, lower-cases, strips accents and splits `text` into words and
/// punctuation marks.
fn basic_tokens(text: &str) -> Vec<String> {
    let mut spaced = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\0' || c == '\u{fffd}' || (c.is_control() && !c.is_whitespace()) {
            continue;
        }
        if is_cjk(c) {
            spaced.extend([' ', c, ' ']);
        } else if c.is_whitespace() {
            spaced.push(' ');
        } else {
            spaced.push(c);
        }
    }
    let mut tokens = Vec::new();
    for word in spaced.split_whitespace() {
        let normalised: String = word
            .to_lowercase()
            .nfd()
            .filter(|&c| !is_combining_mark(c))
            .collect();
        split_punctuation(&normalised, &mut tokens);
    }
    tokens
}

fn split_punctuation(word: &str, tokens: &mut Vec<String>) {
    let mut current = String::new();
    for c in word.chars() {
        if is_punctuation(c) {
            if !current.is_empty() {
                tokens.push(std::mem::take(&mut current));
            }
            tokens.push(c.to_string());
        } else {
            current.push(c);
        }
    }
    if !current.is_empty() {
        tokens.push(current);
    }
}

/// BERT treats all non-alphanumeric ASCII symbols as punctuation, plus the
/// Unicode punctuation blocks.
fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(c as u32,
            0x00A1..=0x00BF | 0x2010..=0x2027 | 0x2030..=0x205E | 0x3001..=0x3003
            | 0x3008..=0x3011 | 0x3014..=0x301F | 0xFF01..=0xFF0F | 0xFF1A..=0xFF20
            | 0xFF3B..=0xFF40 | 0xFF5B..=0xFF65)
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VOCAB: &str = "[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\nfox\nrun\n##ning\n.\n,\ncafe\n";

    fn tokenizer() -> WordPiece {
        WordPiece::from_vocab(VOCAB).unwrap()
    }

    #[test]
    fn splits_words_pieces_and_punctuation() {
        let encoding = tokenizer().encode("The  FOX, running.", 64);
        assert_eq!(encoding.ids, vec![2, 4, 5, 9, 6, 7, 8, 3]);
    }

    #[test]
    fn strips_accents_and_marks_unknown_words() {
        let encoding = tokenizer().encode("Café zebra", 64);
        assert_eq!(encoding.ids, vec![2, 10, 1, 3]);
    }

    #[test]
    fn truncates_to_the_token_budget() {
        let encoding = tokenizer().encode("the fox the fox the fox", 4);
        assert_eq!(encoding.ids, vec![2, 4, 5, 3]);
    }

    #[test]
    fn vocabulary_needs_special_tokens() {
        let error = WordPiece::from_vocab("the\nfox\n").unwrap_err();
        assert!(error.contains("[CLS]"), "{error}");
    }
}
