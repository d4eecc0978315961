//! Language identification: ISO 639-3 codes (`eng`, `deu`, `cmn`, ...) from
//! one of two detectors, chosen by `clean.language_detector`.
//!
//! - [`LanguageDetector::Fast`] (the default), `whichlang`: a linear model
//!   over hashed character n-grams that tells 16 languages apart in a few
//!   microseconds. It gives no confidence (the crate exposes only the winning
//!   language, not its scores), so [`Language::confidence`] is `None`. It
//!   only knows its 16 languages: a text in another language of the same
//!   script (Polish, Ukrainian, Persian, ...) gets the code of the nearest
//!   one. A text whose main script none of them is written in (Greek,
//!   Hebrew, Thai, ...) is [`UNDETERMINED`] rather than mislabelled.
//! - [`LanguageDetector::Broad`], `whatlang`: trigram profiles of 70
//!   languages, with a confidence. It scores every profile of the text's
//!   script: about 75 µs per Latin-script text whatever its length, against
//!   about 6 µs with `fast`, which halves what `sift clean` gets through.
//!
//! Both tell from the first [`SAMPLE_BYTES`] of a text, and both give
//! [`UNDETERMINED`] for a text without letters (digits and punctuation only).

use whatlang::Script;

/// The code of a text whose language could not be told (ISO 639-3 `und`).
pub const UNDETERMINED: &str = "und";

/// Bytes of a text the language is told from. Trigram statistics settle
/// within a few hundred characters: on the debtags corpus a 512-byte sample
/// agrees with the whole 5 KB text on every document, at under half the cost.
pub const SAMPLE_BYTES: usize = 512;

pub use crate::config::LanguageDetector;

/// A text's language.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Language {
    /// ISO 639-3 code (`eng`, `deu`, ...), or [`UNDETERMINED`].
    pub code: &'static str,
    /// How sure the detector is, 0 to 1, rounded to 3 decimals; `None`
    /// where the detector gives no confidence (`fast`).
    pub confidence: Option<f64>,
}

impl Language {
    const UNDETERMINED: Language = Language {
        code: UNDETERMINED,
        confidence: None,
    };
}

impl LanguageDetector {
    /// The name used in the config file.
    pub fn name(self) -> &'static str {
        match self {
            LanguageDetector::Fast => "fast",
            LanguageDetector::Broad => "broad",
        }
    }

    /// The language of `text`, from its first [`SAMPLE_BYTES`].
    pub fn detect(self, text: &str) -> Language {
        let mut end = text.len().min(SAMPLE_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let sample = &text[..end];
        match self {
            LanguageDetector::Fast => detect_fast(sample),
            LanguageDetector::Broad => detect_broad(sample),
        }
    }

    /// The codes [`detect`](Self::detect) can return, [`UNDETERMINED`] last.
    pub fn codes(self) -> Vec<&'static str> {
        let mut codes: Vec<&'static str> = match self {
            LanguageDetector::Fast => whichlang::LANGUAGES
                .iter()
                .map(|l| l.three_letter_code())
                .collect(),
            LanguageDetector::Broad => whatlang::Lang::all().iter().map(|l| l.code()).collect(),
        };
        codes.sort_unstable();
        codes.push(UNDETERMINED);
        codes
    }

    /// Whether `code` is a language code [`detect`](Self::detect) can return.
    pub fn is_known(self, code: &str) -> bool {
        match self {
            LanguageDetector::Fast => {
                code == UNDETERMINED
                    || whichlang::LANGUAGES
                        .iter()
                        .any(|l| l.three_letter_code() == code)
            }
            LanguageDetector::Broad => {
                code == UNDETERMINED || whatlang::Lang::from_code(code).is_some()
            }
        }
    }
}

/// The scripts whichlang's languages are written in. The main script is
/// counted first (a cheap pass, a few ns a character) so that texts without
/// letters, or in a script whichlang was not trained on, are `und` rather
/// than whichever of its 16 languages scores highest (it answers English for
/// a text with no features at all).
fn whichlang_reads(script: Script) -> bool {
    matches!(
        script,
        Script::Latin
            | Script::Cyrillic
            | Script::Arabic
            | Script::Devanagari
            | Script::Mandarin
            | Script::Hiragana
            | Script::Katakana
            | Script::Hangul
    )
}

fn detect_fast(sample: &str) -> Language {
    match whatlang::detect_script(sample) {
        Some(script) if whichlang_reads(script) => Language {
            // whichlang's codes are ISO 639-3 already (`cmn` for Mandarin,
            // `ara` for Arabic), the same as whatlang's; a test checks it.
            code: whichlang::detect_language(sample).three_letter_code(),
            confidence: None,
        },
        _ => Language::UNDETERMINED,
    }
}

fn detect_broad(sample: &str) -> Language {
    match whatlang::detect(sample) {
        Some(info) => Language {
            code: info.lang().code(),
            confidence: Some((info.confidence() * 1000.0).round() / 1000.0),
        },
        None => Language::UNDETERMINED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EN: &str =
        "The committee will publish its annual report on the state of the railways next week.";
    const DE: &str = "Der Ausschuss veröffentlicht nächste Woche seinen Jahresbericht über den Zustand der Eisenbahn.";
    const FR: &str =
        "Le comité publiera la semaine prochaine son rapport annuel sur l'état des chemins de fer.";

    #[test]
    fn fast_detects_common_languages() {
        let fast = LanguageDetector::Fast;
        let en = fast.detect(EN);
        assert_eq!(en.code, "eng");
        assert_eq!(en.confidence, None);
        assert_eq!(fast.detect(DE).code, "deu");
        assert_eq!(fast.detect(FR).code, "fra");
        for (text, code) in [
            ("El comité publicará la próxima semana su informe anual sobre el estado de los ferrocarriles.", "spa"),
            ("Комитет опубликует на следующей неделе свой ежегодный доклад о состоянии железных дорог.", "rus"),
            ("委员会将于下周发布关于铁路状况的年度报告。", "cmn"),
            ("委員会は来週、鉄道の状況に関する年次報告書を発表します。", "jpn"),
            ("위원회는 다음 주에 철도 상태에 관한 연례 보고서를 발표할 예정이다.", "kor"),
            ("समिति अगले सप्ताह रेलवे की स्थिति पर अपनी वार्षिक रिपोर्ट प्रकाशित करेगी।", "hin"),
        ] {
            assert_eq!(fast.detect(text).code, code, "{text}");
        }
        // No letters, and a script none of whichlang's languages is written in.
        assert_eq!(fast.detect("1234 5678 !!!").code, UNDETERMINED);
        assert_eq!(fast.detect("").code, UNDETERMINED);
        assert_eq!(
            fast.detect("Η επιτροπή θα δημοσιεύσει την ετήσια έκθεσή της την επόμενη εβδομάδα.")
                .code,
            UNDETERMINED
        );
        // A sample cut inside a multi-byte character still works.
        let long = "é".repeat(SAMPLE_BYTES);
        let _ = fast.detect(&long);
    }

    #[test]
    fn broad_detects_common_languages() {
        let broad = LanguageDetector::Broad;
        let en = broad.detect(EN);
        assert_eq!(en.code, "eng");
        assert!(en.confidence.is_some_and(|c| c > 0.5), "{en:?}");
        assert_eq!(broad.detect(DE).code, "deu");
        assert_eq!(broad.detect(FR).code, "fra");
        // Beyond whichlang's 16.
        assert_eq!(
            broad
                .detect(
                    "Komitet opublikuje w przyszłym tygodniu swój roczny raport o stanie kolei."
                )
                .code,
            "pol"
        );
        assert_eq!(broad.detect("1234 5678 !!!").code, UNDETERMINED);
        let long = "é".repeat(SAMPLE_BYTES);
        let _ = broad.detect(&long);
    }

    #[test]
    fn known_codes() {
        for d in [LanguageDetector::Fast, LanguageDetector::Broad] {
            assert!(d.is_known("eng"), "{d:?}");
            assert!(d.is_known("cmn"), "{d:?}");
            assert!(d.is_known("und"), "{d:?}");
            assert!(!d.is_known("en"), "{d:?}");
            assert!(!d.is_known("xyz"), "{d:?}");
            assert!(d.codes().iter().all(|c| d.is_known(c)), "{d:?}");
        }
        assert!(!LanguageDetector::Fast.is_known("pol"));
        assert!(LanguageDetector::Broad.is_known("pol"));
        assert_eq!(LanguageDetector::Fast.codes().len(), 17);
        assert_eq!(LanguageDetector::Broad.codes().len(), 71);
        // Both detectors speak the same codes: every fast one is a broad one.
        for code in LanguageDetector::Fast.codes() {
            assert!(LanguageDetector::Broad.is_known(code), "{code}");
        }
    }
}
