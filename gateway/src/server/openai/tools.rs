//! Tool calling on any model, whether or not its chat template knows
//! tools. The tools are described to the model in a system message, and
//! calls are written as JSON in `<tool_call>` tags (the convention of the
//! Hermes and Qwen families, which many small models learnt); the output
//! is constrained by a grammar over the tools' parameter schemas, so a
//! call always names a tool and its arguments always validate. Under
//! `auto` the model may write text instead (any answer that does not open
//! with a call tag).
//!
//! The same [`Calls`] reader turns the text into calls for whole answers
//! and for streams, so a streamed call is the call the whole answer has.

use serde_json::{Value, json};

use super::fields::{Fields, invalid, kind_of};
use crate::server::ApiError;

/// What opens a call in the model's output.
const OPEN: &str = "<tool_call>\n";
/// What closes one.
const CLOSE: &str = "\n</tool_call>";
/// The most tools one request may declare.
const MAX_TOOLS: usize = 128;

/// A function the model may call.
#[derive(Debug, Clone)]
struct Tool {
    name: String,
    description: Option<String>,
    /// A JSON schema of its arguments (an object).
    parameters: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
enum Choice {
    Auto,
    Required,
    Named(String),
}

/// The request's tools, when the model may call them.
#[derive(Debug, Clone)]
pub(super) struct Tools {
    tools: Vec<Tool>,
    choice: Choice,
    parallel: bool,
}

/// JSON as the grammar writes it: one space after `:` and `,`, no other
/// whitespace (a model left free to add whitespace can add it forever).
fn compact(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Value::Object(map) = &mut schema {
        map.insert(
            "x-guidance".into(),
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// `response_format`: the JSON schema the answer must match, if any.
pub(super) fn response_format(fields: &mut Fields) -> Result<Option<Value>, ApiError> {
    let Some(format) = fields.take("response_format") else {
        return Ok(None);
    };
    let mut format = Fields::of(format, "response_format")?;
    match format.required_string("type")?.as_str() {
        "text" => Ok(None),
        "json_object" => Ok(Some(compact(&json!({"type": "object"})))),
        "json_schema" => {
            let spec = format
                .take("json_schema")
                .ok_or_else(|| invalid("response_format.json_schema", "this field is required"))?;
            let mut spec = Fields::of(spec, "response_format.json_schema")?;
            spec.required_string("name")?;
            // `strict` or not, the schema is enforced: an answer that does
            // not match it is never what the caller wants.
            spec.boolean("strict")?;
            match spec.take("schema") {
                None => Ok(Some(compact(&json!({"type": "object"})))),
                Some(schema @ Value::Object(_)) => Ok(Some(compact(&schema))),
                Some(other) => Err(invalid(
                    "response_format.json_schema.schema",
                    format!("expected a JSON schema object, not {}", kind_of(&other)),
                )),
            }
        }
        other => Err(invalid(
            "response_format.type",
            format!("{other:?} is not one of \"text\", \"json_object\", \"json_schema\""),
        )),
    }
}

impl Tools {
    /// `tools`, `tool_choice` and `parallel_tool_calls`; `None` when no
    /// call may be made (no tools, or `tool_choice: "none"`).
    pub(super) fn read(fields: &mut Fields) -> Result<Option<Self>, ApiError> {
        let parallel = fields.boolean("parallel_tool_calls")?.unwrap_or(true);
        let choice = fields.take("tool_choice");
        let tools = match fields.take("tools") {
            None => vec![],
            Some(Value::Array(tools)) => tools
                .into_iter()
                .enumerate()
                .map(|(index, tool)| tool_of(index, tool))
                .collect::<Result<Vec<_>, _>>()?,
            Some(other) => {
                return Err(invalid(
                    "tools",
                    format!("expected a list of tools, not {}", kind_of(&other)),
                ));
            }
        };
        if tools.len() > MAX_TOOLS {
            return Err(invalid("tools", format!("at most {MAX_TOOLS} tools")));
        }
        for (index, tool) in tools.iter().enumerate() {
            if tools[..index].iter().any(|t| t.name == tool.name) {
                return Err(invalid(
                    &format!("tools[{index}].function.name"),
                    format!("{:?} is declared twice", tool.name),
                ));
            }
        }
        let choice = match choice {
            None => Choice::Auto,
            Some(Value::String(choice)) => match choice.as_str() {
                "none" => return Ok(None),
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                other => {
                    return Err(invalid(
                        "tool_choice",
                        format!(
                            "{other:?} is not one of \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"function\": {{\"name\": …}}}}"
                        ),
                    ));
                }
            },
            Some(named @ Value::Object(_)) => {
                let mut named = Fields::of(named, "tool_choice")?;
                let kind = named.required_string("type")?;
                if kind != "function" {
                    return Err(invalid(
                        "tool_choice.type",
                        format!("{kind:?}: only \"function\" is supported"),
                    ));
                }
                let function = named
                    .take("function")
                    .ok_or_else(|| invalid("tool_choice.function", "this field is required"))?;
                let name = Fields::of(function, "tool_choice.function")?.required_string("name")?;
                if !tools.iter().any(|t| t.name == name) {
                    return Err(invalid(
                        "tool_choice.function.name",
                        format!("{name:?} is not one of the request's tools"),
                    ));
                }
                Choice::Named(name)
            }
            Some(other) => {
                return Err(invalid(
                    "tool_choice",
                    format!("expected a string or an object, not {}", kind_of(&other)),
                ));
            }
        };
        if tools.is_empty() {
            if choice != Choice::Auto {
                return Err(invalid("tool_choice", "there are no tools to choose from"));
            }
            return Ok(None);
        }
        Ok(Some(Self {
            tools,
            choice,
            parallel,
        }))
    }

    /// The system message that describes the tools and how to call them.
    pub(super) fn instructions(&self) -> String {
        let mut text = String::from(
            "You can call functions to help with the user's request. Their signatures are in <tools></tools>, one JSON object per line:\n<tools>\n",
        );
        for tool in self.offered() {
            let mut function = json!({"name": tool.name, "parameters": tool.parameters});
            if let Some(description) = &tool.description {
                function["description"] = json!(description);
            }
            text.push_str(&json!({"type": "function", "function": function}).to_string());
            text.push('\n');
        }
        text.push_str(
            "</tools>\nTo call a function, answer with its name and arguments as a JSON object within <tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function name>, \"arguments\": <arguments object>}\n</tool_call>",
        );
        match &self.choice {
            Choice::Auto => text.push_str("\nIf no function is needed, answer in plain text."),
            Choice::Required => text.push_str("\nYou must call a function."),
            Choice::Named(name) => {
                text.push_str(&format!("\nYou must call the function {name:?}."));
            }
        }
        if self.parallel {
            text.push_str(" You may call several functions, one tag each.");
        }
        text
    }

    /// The tools a call may name.
    fn offered(&self) -> impl Iterator<Item = &Tool> {
        self.tools.iter().filter(|tool| match &self.choice {
            Choice::Named(name) => &tool.name == name,
            _ => true,
        })
    }

    /// The grammar (llguidance's Lark) of an answer: calls to the offered
    /// tools with arguments that match their schemas, or under `auto`
    /// text that does not open with a call.
    pub(super) fn grammar(&self) -> String {
        let mut grammar = String::new();
        grammar.push_str(match self.choice {
            Choice::Auto => "start: TEXT | calls\nTEXT: /[^<](.|\\n)*/\n",
            _ => "start: calls\n",
        });
        grammar.push_str(if self.parallel {
            "calls: call (\"\\n\" call)*\n"
        } else {
            "calls: call\n"
        });
        let functions: Vec<String> = (0..self.offered().count())
            .map(|i| format!("f{i}"))
            .collect();
        grammar.push_str(&format!(
            "call: {} ({}) {}\n",
            lark_string(OPEN),
            functions.join(" | "),
            lark_string(CLOSE)
        ));
        for (index, tool) in self.offered().enumerate() {
            let head = format!("{{\"name\": {}, \"arguments\": ", json!(tool.name));
            grammar.push_str(&format!(
                "f{index}: {} a{index} \"}}\"\na{index}: %json {}\n",
                lark_string(&head),
                compact(&tool.parameters)
            ));
        }
        grammar
    }
}

/// `text` as a Lark string literal (JSON string syntax).
fn lark_string(text: &str) -> String {
    json!(text).to_string()
}

/// `tools[index]`: `{"type": "function", "function": {"name", "description", "parameters"}}`.
fn tool_of(index: usize, tool: Value) -> Result<Tool, ApiError> {
    let at = format!("tools[{index}]");
    let mut tool = Fields::of(tool, &at)?;
    let kind = tool.required_string("type")?;
    if kind != "function" {
        return Err(invalid(
            &tool.path("type"),
            format!("{kind:?}: only \"function\" tools are supported"),
        ));
    }
    let function = tool
        .take("function")
        .ok_or_else(|| invalid(&tool.path("function"), "this field is required"))?;
    let mut function = Fields::of(function, &tool.path("function"))?;
    let name = function.required_string("name")?;
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(invalid(
            &function.path("name"),
            format!("{name:?}: use 1 to 64 letters, digits, underscores or dashes"),
        ));
    }
    let description = function.string("description")?;
    function.boolean("strict")?;
    let parameters = match function.take("parameters") {
        None => json!({"type": "object", "properties": {}}),
        Some(schema @ Value::Object(_)) => schema,
        Some(other) => {
            return Err(invalid(
                &function.path("parameters"),
                format!("expected a JSON schema object, not {}", kind_of(&other)),
            ));
        }
    };
    Ok(Tool {
        name,
        description,
        parameters,
    })
}

/// An assistant turn's calls as the model writes them, for the prompt.
pub(super) fn written_calls(calls: &[Value], at: &str) -> Result<String, ApiError> {
    let mut text = Vec::new();
    for (index, call) in calls.iter().enumerate() {
        let at = format!("{at}[{index}]");
        let function = &call["function"];
        let Some(name) = function["name"].as_str() else {
            return Err(invalid(
                &format!("{at}.function.name"),
                "this field is required",
            ));
        };
        let arguments = match &function["arguments"] {
            Value::String(text) => serde_json::from_str(text).unwrap_or(json!(text)),
            Value::Null => json!({}),
            other => other.clone(),
        };
        text.push(format!(
            "{OPEN}{{\"name\": {}, \"arguments\": {arguments}}}{CLOSE}",
            json!(name)
        ));
    }
    Ok(text.join("\n"))
}

/// A tool's result as the model reads it.
pub(super) fn written_result(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// A call the model made.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Call {
    pub name: String,
    /// The arguments, as compact JSON text.
    pub arguments: String,
}

impl Call {
    /// OpenAI's `tool_calls` entry, under a fresh id.
    pub(super) fn to_json(&self) -> Value {
        json!({
            "id": format!("call_{}", super::completion_id()),
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }
}

/// What a piece of the answer turned out to be.
#[derive(Debug, PartialEq)]
pub(super) enum Piece {
    Text(String),
    Call(Call),
}

/// Reads the answer as it arrives: text passes through; an answer that
/// opens with a call tag yields each call once its tag closes.
#[derive(Debug, Default)]
pub(super) struct Calls {
    /// Text not yet known to be text or calls, or calls not yet closed.
    held: String,
    /// `Some(true)` once the answer is known to be calls.
    calling: Option<bool>,
}

impl Calls {
    pub(super) fn push(&mut self, text: &str) -> Vec<Piece> {
        self.held.push_str(text);
        if self.calling.is_none() {
            if OPEN.starts_with(self.held.as_str()) && self.held.len() < OPEN.len() {
                return vec![];
            }
            self.calling = Some(self.held.starts_with(OPEN));
        }
        if self.calling == Some(false) {
            return vec![Piece::Text(std::mem::take(&mut self.held))];
        }
        let mut pieces = Vec::new();
        while let Some(call) = self.next_call() {
            pieces.push(Piece::Call(call));
        }
        pieces
    }

    /// The first closed call in `held`, taken out of it.
    fn next_call(&mut self) -> Option<Call> {
        let start = self.held.find(OPEN)?;
        let end = start + self.held[start..].find(CLOSE)?;
        let body = &self.held[start + OPEN.len()..end];
        let call = serde_json::from_str::<Value>(body).ok().and_then(|value| {
            Some(Call {
                name: value["name"].as_str()?.to_string(),
                arguments: value.get("arguments")?.to_string(),
            })
        });
        let call = call?;
        self.held.drain(..end + CLOSE.len());
        Some(call)
    }

    /// The end of the answer: what is left (an unknown start, or a call
    /// cut short by `max_tokens`) as text.
    pub(super) fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.held);
        let rest = if self.calling == Some(true) {
            rest.trim_start_matches('\n').to_string()
        } else {
            rest
        };
        if rest.is_empty() {
            vec![]
        } else {
            vec![Piece::Text(rest)]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: Value) -> Result<Option<Tools>, ApiError> {
        Tools::read(&mut Fields::of(body, "").unwrap())
    }

    fn weather() -> Value {
        json!({"type": "function", "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }})
    }

    #[test]
    fn calls_are_read_whole_or_in_any_pieces_alike() {
        let answer = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
        let mut whole = Calls::default();
        let mut pieces = whole.push(answer);
        pieces.extend(whole.finish());
        for size in [1, 3, 7] {
            let mut calls = Calls::default();
            let mut streamed = Vec::new();
            let chars: Vec<char> = answer.chars().collect();
            for chunk in chars.chunks(size) {
                streamed.extend(calls.push(&chunk.iter().collect::<String>()));
            }
            streamed.extend(calls.finish());
            assert_eq!(streamed, pieces);
        }
        assert_eq!(
            pieces,
            vec![
                Piece::Call(Call {
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into()
                }),
                Piece::Call(Call {
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Oslo"}"#.into()
                }),
            ]
        );
    }

    #[test]
    fn text_passes_through_and_a_cut_call_is_kept_as_text() {
        let mut calls = Calls::default();
        assert_eq!(calls.push("<to"), vec![]);
        assert_eq!(calls.push("day"), vec![Piece::Text("<today".into())]);
        let mut cut = Calls::default();
        assert_eq!(cut.push("<tool_call>\n{\"name\": \"f"), vec![]);
        assert_eq!(
            cut.finish(),
            vec![Piece::Text("<tool_call>\n{\"name\": \"f".into())]
        );
    }

    #[test]
    fn tool_choice_is_checked_against_the_tools() {
        assert!(read(json!({"tools": [weather()]})).unwrap().is_some());
        assert!(
            read(json!({"tools": [weather()], "tool_choice": "none"}))
                .unwrap()
                .is_none()
        );
        let named = json!({"type": "function", "function": {"name": "get_time"}});
        let error = read(json!({"tools": [weather()], "tool_choice": named})).unwrap_err();
        assert!(error.message().contains("not one of the request's tools"));
        let error = read(json!({"tools": [weather(), weather()]})).unwrap_err();
        assert!(error.message().contains("declared twice"));
        let error = read(json!({"tool_choice": "required"})).unwrap_err();
        assert!(error.message().contains("no tools"));
        let bad = json!({"type": "function", "function": {"name": "get weather"}});
        assert!(read(json!({"tools": [bad]})).is_err());
    }

    #[test]
    fn the_grammar_offers_only_the_named_tool() {
        let time = json!({"type": "function", "function": {"name": "get_time"}});
        let named = json!({"type": "function", "function": {"name": "get_time"}});
        let tools = read(json!({"tools": [weather(), time], "tool_choice": named,
                                "parallel_tool_calls": false}))
        .unwrap()
        .unwrap();
        let grammar = tools.grammar();
        assert!(grammar.starts_with("start: calls\ncalls: call\n"));
        assert!(grammar.contains("get_time") && !grammar.contains("get_weather"));
    }
}
