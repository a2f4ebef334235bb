//! A model's chat template (`tokenizer.chat_template`, Jinja) rendered as
//! Hugging Face's transformers and llama.cpp's `--jinja` render it: the
//! same context (`messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token`, `raise_exception`, `strftime_now`), Python's string
//! methods, and `tojson` writing what Python's `json.dumps` writes. So a
//! prompt is what the model was trained on, default system prompt
//! included, and the same as other servers of the model send it.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior};
use serde::Serialize;

/// Template work per rendering (minijinja's fuel: roughly one unit per
/// instruction). A template is the operator's, but it loops over the
/// caller's messages; this bounds a pathological one.
const FUEL: u64 = 2_000_000;

/// One message as the template sees it.
#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

/// A compiled chat template and the special tokens' text it is given.
pub struct ChatTemplate {
    environment: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Compiles `source`; `bos` and `eos` are the model's tokens' text
    /// (empty when it has none).
    pub fn new(source: &str, bos: String, eos: String) -> Result<Self, String> {
        let mut environment = Environment::new();
        environment
            .set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        environment.set_undefined_behavior(UndefinedBehavior::Lenient);
        environment.set_fuel(Some(FUEL));
        // As transformers sets up its Jinja environment.
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| e.to_string())?;
        environment.set_syntax(syntax);
        environment.add_filter("tojson", to_json);
        environment.add_function(
            "raise_exception",
            |message: String| -> Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        environment.add_function("strftime_now", strftime_now);
        environment
            .add_template_owned("chat", source.to_string())
            .map_err(|e| format!("the chat template does not compile: {e:#}"))?;
        Ok(ChatTemplate {
            environment,
            bos,
            eos,
        })
    }

    /// The prompt for `messages` (role, content), ending with the
    /// assistant's turn opened.
    pub fn render(&self, messages: &[(String, String)]) -> Result<String, String> {
        let messages: Vec<Message<'_>> = messages
            .iter()
            .map(|(role, content)| Message { role, content })
            .collect();
        let template = self
            .environment
            .get_template("chat")
            .map_err(|e| e.to_string())?;
        template
            .render(minijinja::context! {
                messages => Value::from(Serde(&messages)),
                add_generation_prompt => true,
                bos_token => &self.bos,
                eos_token => &self.eos,
            })
            .map_err(|e| match e.kind() {
                // The template's own refusal, e.g. roles out of order.
                ErrorKind::InvalidOperation => e.detail().unwrap_or("refused").to_string(),
                _ => e.to_string(),
            })
    }

    /// Whether a rendered prompt already starts with the BOS token's text
    /// (so tokenising must not add another).
    pub fn starts_with_bos(&self, prompt: &str) -> bool {
        !self.bos.is_empty() && prompt.starts_with(&self.bos)
    }
}

/// `tojson` as transformers defines it: Python's `json.dumps` (", " and
/// ": " between items, non-ASCII kept, `indent` when asked), not
/// minijinja's HTML-safe variant.
fn to_json(value: &Value, indent: Option<usize>, kwargs: Kwargs) -> Result<String, Error> {
    // `ensure_ascii`, `sort_keys` and `separators` are accepted and, but
    // for the defaults, not honoured; no known template sets them.
    let indent = match indent {
        Some(width) => Some(width),
        None => kwargs.get::<Option<usize>>("indent")?,
    };
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    let _: Option<Value> = kwargs.get("sort_keys")?;
    let _: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let result = match indent {
        Some(width) => {
            let indent = " ".repeat(width);
            let formatter = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
            value.serialize(&mut serde_json::Serializer::with_formatter(
                &mut out, formatter,
            ))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PythonFormatter,
        )),
    };
    result.map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    String::from_utf8(out).map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))
}

/// `json.dumps`'s default separators: `", "` and `": "`.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        comma(writer, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        comma(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}

/// `", "` before every item but the first.
fn comma<W: ?Sized + std::io::Write>(writer: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

/// `strftime_now(format)`: the date some templates put in the system
/// prompt (UTC; `%d %b %Y`-style formats).
fn strftime_now(format: String) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (now / 86_400) as i64;
    let (year, month, day) = civil_from_days(days);
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn chat(messages: &[(&str, &str)]) -> Vec<(String, String)> {
        messages
            .iter()
            .map(|(r, c)| (r.to_string(), c.to_string()))
            .collect()
    }

    #[test]
    fn the_default_system_prompt_comes_with_the_template() {
        let template = ChatTemplate::new(SMOLLM2, String::new(), "<|im_end|>".into()).unwrap();
        assert_eq!(
            template.render(&chat(&[("user", "Hi")])).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            template
                .render(&chat(&[("system", "Be brief."), ("user", "Hi")]))
                .unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn templates_use_python_methods_special_tokens_and_their_own_refusals() {
        let source = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}[{{ m.role | upper }}] {{ m.content.strip() | tojson }}\n{% endfor %}";
        let template = ChatTemplate::new(source, "<s>".into(), "</s>".into()).unwrap();
        let prompt = template
            .render(&chat(&[("user", "  héllo \"x\" <b>  ")]))
            .unwrap();
        assert_eq!(prompt, "<s>[USER] \"héllo \\\"x\\\" <b>\"\n");
        assert!(template.starts_with_bos(&prompt));
        assert_eq!(
            template.render(&chat(&[("system", "x")])).unwrap_err(),
            "Only user and assistant roles are supported!"
        );
    }

    #[test]
    fn tojson_writes_what_python_writes() {
        let template =
            ChatTemplate::new("{{ messages | tojson }}", String::new(), String::new()).unwrap();
        assert_eq!(
            template.render(&chat(&[("user", "ü <b>")])).unwrap(),
            "[{\"role\": \"user\", \"content\": \"ü <b>\"}]"
        );
        let indented = ChatTemplate::new(
            "{{ messages | tojson(indent=1) }}",
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(
            indented.render(&chat(&[("user", "x")])).unwrap(),
            "[\n {\n  \"role\": \"user\",\n  \"content\": \"x\"\n }\n]"
        );
    }

    #[test]
    fn a_runaway_template_runs_out_of_fuel() {
        let source =
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let template = ChatTemplate::new(source, String::new(), String::new()).unwrap();
        assert!(template.render(&[]).is_err());
    }

    #[test]
    fn dates_are_gregorian() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_423), (2025, 12, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
