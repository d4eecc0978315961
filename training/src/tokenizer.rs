//! A WordPiece tokenizer trained on the corpus, wrapped so that encoding
//! always yields `[CLS] … [SEP]` of at most `max_len` ids and never fails.

use std::path::Path;

use std::collections::BTreeMap;

use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{
    Normalizer, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer,
    TokenizerBuilder, TruncationParams,
};

/// Padding token; id 0, which the batches use for padding.
pub const PAD: &str = "[PAD]";
/// Unknown-word token; id 1.
pub const UNK: &str = "[UNK]";
/// Start token, whose state CLS pooling reads; id 2.
pub const CLS: &str = "[CLS]";
/// End token; id 3.
pub const SEP: &str = "[SEP]";

/// What can go wrong training, reading, writing or running the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// `max_len` cannot hold `[CLS]` and `[SEP]`.
    #[error("max_len {0} is too small; it must be at least 2 to hold [CLS] and [SEP]")]
    MaxLen(usize),
    /// The `tokenizers` library reported an error.
    #[error("tokenizer {context}: {message}")]
    Library {
        /// What was being done (and on which file).
        context: String,
        /// The library's message.
        message: String,
    },
    /// A loaded tokenizer lacks a special token this crate relies on.
    #[error("tokenizer {path} has no {token} token; train one with sift or use a BERT-style tokenizer.json")]
    MissingToken {
        /// The file.
        path: String,
        /// The missing token.
        token: &'static str,
    },
}

fn library(context: impl Into<String>) -> impl FnOnce(tokenizers::Error) -> TokenizerError {
    let context = context.into();
    move |e| TokenizerError::Library {
        context,
        message: e.to_string(),
    }
}

fn special_id(inner: &Tokenizer, token: &'static str, path: &str) -> Result<u32, TokenizerError> {
    inner
        .token_to_id(token)
        .ok_or_else(|| TokenizerError::MissingToken {
            path: path.to_owned(),
            token,
        })
}

/// Lowercasing, accent-stripping BERT-style WordPiece tokenizer.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    max_len: usize,
}

impl TextTokenizer {
    /// Trains on `texts` with up to `vocab_size` tokens (special tokens
    /// included). `[PAD]`, `[UNK]`, `[CLS]`, `[SEP]` get ids 0 to 3. The
    /// vocabulary is learned by [`crate::vocab`], so the same texts always
    /// give the same tokenizer.
    pub fn train<I, S>(texts: I, vocab_size: usize, max_len: usize) -> Result<Self, TokenizerError>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        if max_len < 2 {
            return Err(TokenizerError::MaxLen(max_len));
        }
        let normalizer = BertNormalizer::new(true, true, Some(true), true);
        let mut word_counts: BTreeMap<String, u64> = BTreeMap::new();
        for text in texts {
            let mut pre = PreTokenizedString::from(text.as_ref());
            pre.normalize(|s| normalizer.normalize(s))
                .map_err(library("normalizing"))?;
            BertPreTokenizer
                .pre_tokenize(&mut pre)
                .map_err(library("splitting words"))?;
            for (word, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::Byte) {
                if let Some(count) = word_counts.get_mut(word) {
                    *count += 1;
                } else {
                    word_counts.insert(word.to_owned(), 1);
                }
            }
        }
        let specials = [PAD, UNK, CLS, SEP];
        let pieces = crate::vocab::learn(&word_counts, vocab_size.saturating_sub(specials.len()));
        let vocab: ahash::AHashMap<String, u32> = specials
            .iter()
            .map(|s| (*s).to_owned())
            .chain(
                pieces
                    .into_iter()
                    .filter(|p| !specials.contains(&p.as_str())),
            )
            .enumerate()
            .map(|(i, token)| (token, i as u32))
            .collect();
        let model = WordPiece::builder()
            .vocab(vocab)
            .unk_token(UNK.to_owned())
            .continuing_subword_prefix(crate::vocab::CONTINUATION.to_owned())
            .build()
            .map_err(library("building the WordPiece model"))?;
        let tokenizer = TokenizerBuilder::new()
            .with_model(model)
            .with_normalizer(Some(normalizer))
            .with_pre_tokenizer(Some(BertPreTokenizer))
            .with_post_processor(None::<BertProcessing>)
            .with_decoder(None::<tokenizers::decoders::wordpiece::WordPiece>)
            .build()
            .map_err(library("building"))?;
        let mut inner = Tokenizer::from(tokenizer);
        let processor = BertProcessing::new(
            (SEP.to_owned(), special_id(&inner, SEP, "<trained>")?),
            (CLS.to_owned(), special_id(&inner, CLS, "<trained>")?),
        );
        inner.with_post_processor(Some(processor));
        inner.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
        Self::with_max_len(inner, max_len, "<trained>")
    }

    /// Reads a `tokenizer.json` (one saved by [`save`](Self::save) or a
    /// BERT-style one) and truncates to `max_len`.
    pub fn load(path: impl AsRef<Path>, max_len: usize) -> Result<Self, TokenizerError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let inner = Tokenizer::from_file(path).map_err(library(format!("reading {shown}")))?;
        Self::with_max_len(inner, max_len, &shown)
    }

    fn with_max_len(
        mut inner: Tokenizer,
        max_len: usize,
        path: &str,
    ) -> Result<Self, TokenizerError> {
        if max_len < 2 {
            return Err(TokenizerError::MaxLen(max_len));
        }
        for token in [PAD, UNK, CLS, SEP] {
            special_id(&inner, token, path)?;
        }
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..TruncationParams::default()
            }))
            .map_err(library("setting truncation"))?;
        inner.with_padding(None);
        Ok(Self { inner, max_len })
    }

    /// Writes `tokenizer.json`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), TokenizerError> {
        let path = path.as_ref();
        self.inner
            .save(path, false)
            .map_err(library(format!("writing {}", path.display())))
    }

    /// `[CLS]`, the text's token ids, `[SEP]`; truncated to `max_len`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self.inner.encode(text, true).map_err(library("encoding"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The longest sequence [`encode`](Self::encode) returns.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Number of tokens (the model's `vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CORPUS: [&str; 4] = [
        "Vim is a text editor.\nA highly configurable text editor.",
        "Emacs: the extensible, customizable text editor.",
        "Python library for parsing HTML; a parsing library.",
        "Café résumé naïve editor",
    ];

    fn tokens(tokenizer: &TextTokenizer, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&id| tokenizer.id_to_token(id).expect("id from the tokenizer"))
            .collect()
    }

    #[test]
    fn trains_with_fixed_special_ids_and_encodes_words() -> anyhow::Result<()> {
        let tokenizer = TextTokenizer::train(CORPUS.iter(), 200, 16)?;
        for (id, token) in [PAD, UNK, CLS, SEP].into_iter().enumerate() {
            assert_eq!(tokenizer.token_to_id(token), Some(id as u32));
        }
        assert!(tokenizer.vocab_size() <= 200);
        let ids = tokenizer.encode("TEXT Éditor")?;
        assert_eq!(
            tokens(&tokenizer, &ids),
            ["[CLS]", "text", "editor", "[SEP]"]
        );
        let ids = tokenizer.encode("")?;
        assert_eq!(tokens(&tokenizer, &ids), ["[CLS]", "[SEP]"]);
        Ok(())
    }

    #[test]
    fn truncates_long_text_keeping_cls() -> anyhow::Result<()> {
        let tokenizer = TextTokenizer::train(CORPUS.iter(), 200, 6)?;
        let long = "text editor ".repeat(10_000);
        let ids = tokenizer.encode(&long)?;
        assert_eq!(ids.len(), 6);
        assert_eq!(ids[0], 2);
        assert_eq!(tokens(&tokenizer, &ids[1..3]), ["text", "editor"]);
        assert!(matches!(
            TextTokenizer::train(CORPUS.iter(), 200, 1),
            Err(TokenizerError::MaxLen(1))
        ));
        Ok(())
    }

    #[test]
    fn saves_and_loads_tokenizer_json() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tokenizer.json");
        let tokenizer = TextTokenizer::train(CORPUS.iter(), 200, 16)?;
        tokenizer.save(&path)?;
        let loaded = TextTokenizer::load(&path, 16)?;
        assert_eq!(loaded.vocab_size(), tokenizer.vocab_size());
        let text = "parsing HTML with a library";
        assert_eq!(loaded.encode(text)?, tokenizer.encode(text)?);
        let short = TextTokenizer::load(&path, 4)?.encode(text)?;
        assert_eq!(short.len(), 4);
        assert_eq!((short[0], short[3]), (2, 3), "[CLS] first, [SEP] last");
        assert!(TextTokenizer::load(dir.path().join("missing.json"), 4).is_err());
        Ok(())
    }
}
