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
    ids: Table,
    cls: i64,
    sep: i64,
    unk: i64,
    /// One more than the largest id.
    size: i64,
}

/// Piece → id: a map built at run time, or a table sorted at build time
/// (no start-up cost, which matters when every request is a fresh instance).
#[derive(Debug, Clone)]
enum Table {
    Map(HashMap<String, i64>),
    Sorted(&'static [(&'static str, i64)]),
}

impl Table {
    fn get(&self, piece: &str) -> Option<i64> {
        match self {
            Self::Map(map) => map.get(piece).copied(),
            Self::Sorted(table) => table
                .binary_search_by(|(p, _)| p.as_bytes().cmp(piece.as_bytes()))
                .ok()
                .map(|i| table[i].1),
        }
    }
}

/// Rust source for a `&'static [(&str, i64)]` table of `vocab` sorted by
/// bytes, for [`WordPiece::from_sorted`]; call it from a build script and
/// `include!` the file.
pub fn sorted_table_source(vocab: &str) -> String {
    let mut entries: Vec<(&str, usize)> =
        vocab.lines().enumerate().map(|(id, p)| (p, id)).collect();
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    entries.dedup_by(|a, b| a.0 == b.0);
    let mut source = String::from("&[\n");
    for (piece, id) in entries {
        source.push_str(&format!("    ({piece:?}, {id}),\n"));
    }
    source.push(']');
    source
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
        let ids = vocab
            .lines()
            .enumerate()
            .map(|(id, piece)| (piece.to_string(), id as i64))
            .collect();
        Self::with_table(Table::Map(ids))
    }

    /// The tokenizer over a table made by [`sorted_table_source`].
    pub fn from_sorted(table: &'static [(&'static str, i64)]) -> Result<Self, String> {
        Self::with_table(Table::Sorted(table))
    }

    fn with_table(ids: Table) -> Result<Self, String> {
        let special = |name: &str| {
            ids.get(name)
                .ok_or_else(|| format!("vocabulary has no {name} token"))
        };
        let size = match &ids {
            Table::Map(map) => map.values().copied().max(),
            Table::Sorted(table) => table.iter().map(|(_, id)| *id).max(),
        }
        .map_or(0, |id| id + 1);
        Ok(Self {
            cls: special("[CLS]")?,
            sep: special("[SEP]")?,
            unk: special("[UNK]")?,
            ids,
            size,
        })
    }

    /// How many ids the vocabulary has (ids are `0..size`).
    pub fn vocab_size(&self) -> i64 {
        self.size
    }

    /// Tokenises `text` into at most `max_tokens` ids (`[CLS]` and `[SEP]`
    /// included; longer texts are truncated).
    pub fn encode(&self, text: &str, max_tokens: usize) -> Encoding {
        let mut ids = vec![self.cls];
        let budget = max_tokens.saturating_sub(2);
        // Words are normalised and split one at a time, so a long text
        // costs work only up to the budget.
        let spaced = clean(text);
        'words: for word in spaced.split_whitespace() {
            let normalised = normalise(word);
            for token in split_punctuation(&normalised) {
                for id in self.word_pieces(token) {
                    if ids.len() - 1 == budget {
                        break 'words;
                    }
                    ids.push(id);
                }
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
            self.ids.get(&piece).map(|id| (end, id))
        })
    }
}

/// Drops control characters, spaces out CJK ideographs and turns every
/// kind of whitespace into a space.
fn clean(text: &str) -> String {
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
    spaced
}

/// Lower-cases a word and strips its accents.
fn normalise(word: &str) -> String {
    word.to_lowercase()
        .nfd()
        .filter(|&c| !is_combining_mark(c))
        .collect()
}

/// A word's runs of non-punctuation and its punctuation marks, one by one.
fn split_punctuation(word: &str) -> impl Iterator<Item = &str> {
    let mut rest = word;
    std::iter::from_fn(move || {
        let first = rest.chars().next()?;
        let end = if is_punctuation(first) {
            first.len_utf8()
        } else {
            rest.find(is_punctuation).unwrap_or(rest.len())
        };
        let (token, tail) = rest.split_at(end);
        rest = tail;
        Some(token)
    })
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
    fn a_huge_text_costs_only_its_budget() {
        // Eight million punctuation marks in one word: only four become ids
        // (and only those four are split off and looked up).
        let text = "!".repeat(8 << 20);
        let encoding = tokenizer().encode(&text, 6);
        assert_eq!(encoding.ids, vec![2, 1, 1, 1, 1, 3]);
    }

    #[test]
    fn punctuation_splits_inside_words() {
        let pieces: Vec<&str> = split_punctuation("it's-a,b").collect();
        assert_eq!(pieces, vec!["it", "'", "s", "-", "a", ",", "b"]);
    }

    #[test]
    fn truncates_to_the_token_budget() {
        let encoding = tokenizer().encode("the fox the fox the fox", 4);
        assert_eq!(encoding.ids, vec![2, 4, 5, 3]);
    }

    #[test]
    fn a_sorted_table_tokenizes_like_the_map() {
        let source = sorted_table_source(VOCAB);
        assert!(
            source.starts_with("&[\n    (\"##ning\", 7),\n    (\",\", 9),\n"),
            "{source}"
        );
        // The same entries, sorted as the build script would emit them.
        static TABLE: &[(&str, i64)] = &[
            ("##ning", 7),
            (",", 9),
            (".", 8),
            ("[CLS]", 2),
            ("[PAD]", 0),
            ("[SEP]", 3),
            ("[UNK]", 1),
            ("cafe", 10),
            ("fox", 5),
            ("run", 6),
            ("the", 4),
        ];
        let sorted = WordPiece::from_sorted(TABLE).unwrap();
        for text in ["The  FOX, running.", "Café zebra"] {
            assert_eq!(sorted.encode(text, 64), tokenizer().encode(text, 64));
        }
    }

    #[test]
    fn vocabulary_needs_special_tokens() {
        let error = WordPiece::from_vocab("the\nfox\n").unwrap_err();
        assert!(error.contains("[CLS]"), "{error}");
    }
}
