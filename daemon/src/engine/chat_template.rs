//! Chat messages to prompt text, with the model's own Jinja chat template.
//!
//! Hugging Face renders chat templates with Jinja2 in a sandbox with `trim_blocks` and
//! `lstrip_blocks` on, `raise_exception` available, and Python string methods callable on
//! values; templates are written against exactly that, so this renderer reproduces it.

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// Rendering a chat failed.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The template itself does not compile.
    #[error("chat template does not compile: {0}")]
    Compile(String),
    /// The template refused these messages (for example through `raise_exception`).
    #[error("chat template refused the messages: {0}")]
    Refused(String),
}

const TEMPLATE_NAME: &str = "chat";

/// Instructions one rendering may run at most. A bundle's template is its author's code: a
/// loop that never ends, or runs for billions of rounds, must fail the request, not hold an
/// engine or HTTP thread. Rendering the largest chat a request may send takes a small
/// fraction of this.
pub const RENDER_FUEL: u64 = 20_000_000;

impl ChatTemplate {
    /// Compiles `source`. `bos_token` and `eos_token` are the texts the template may insert.
    pub fn compile(
        source: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        env.set_fuel(Some(RENDER_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<String, _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| ChatTemplateError::Compile(e.to_string()))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// Renders the messages; with `add_generation_prompt` the text ends where the
    /// assistant's answer begins.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatTemplateError::Compile(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| ChatTemplateError::Refused(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn a_template_that_would_run_for_ever_is_stopped() {
        let endless = "{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}";
        let template = ChatTemplate::compile(endless, "", "").expect("compiles");
        let started = std::time::Instant::now();
        let error = template
            .render(&[ChatMessage::new("user", "hi")], true)
            .expect_err("stopped");
        assert!(matches!(error, ChatTemplateError::Refused(_)), "{error}");
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        // The largest chat a request may send still renders.
        let template = ChatTemplate::compile(CHATML, "", "").expect("compiles");
        let messages = vec![ChatMessage::new("user", "x".repeat(64)); 65_536];
        template.render(&messages, true).expect("renders");
    }

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::compile(CHATML, "", "<|im_end|>").expect("compiles");
        let text = t
            .render(&[ChatMessage::new("user", "Hi")], true)
            .expect("renders");
        assert_eq!(
            text,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn supports_python_string_methods_and_raise_exception() {
        let source = "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}{{ m.content.strip() }}{% endfor %}";
        let t = ChatTemplate::compile(source, "", "").expect("compiles");
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  x  ")], false)
                .expect("renders"),
            "x"
        );
        let err = t
            .render(&[ChatMessage::new("tool", "x")], false)
            .expect_err("refused");
        assert!(err.to_string().contains("bad role tool"), "{err}");
    }

    #[test]
    fn broken_template_is_a_compile_error() {
        assert!(matches!(
            ChatTemplate::compile("{% for %}", "", ""),
            Err(ChatTemplateError::Compile(_))
        ));
    }
}
