//! Backend command templates: a command line with `{socket}`, `{image}`, `{writable}` and
//! `{queues}` placeholders that describes any backend program, parsed once and filled in per
//! export. Pure parsing, no I/O; it imports [`Export`] from [`export`](super::export) (the values
//! it fills in) and is used by [`spec`](super::spec).

use super::export::Export;

/// Errors of parsing a backend command template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The quoting does not close (an unmatched `'` or `"`, or a trailing `\`).
    #[error("backend command template {0:?}: unbalanced quotes or a trailing backslash")]
    Quoting(String),
    /// The template has no words.
    #[error("backend command template is empty")]
    Empty,
    /// A `{name}` that is not one of the placeholders.
    #[error(
        "backend command template: unknown placeholder {{{0}}}: use {{socket}}, {{image}}, \
         {{writable}}, {{queues}} (and {{{{ or }}}} for a literal brace)"
    )]
    Unknown(String),
    /// A `{` without its `}`, or a lone `}`.
    #[error("backend command template: unmatched brace in {0:?} (write {{{{ or }}}} for a literal brace)")]
    Brace(String),
    /// The template never names the socket, so the backend could not know where to listen.
    #[error("backend command template must contain {{socket}}: the backend listens there")]
    NoSocket,
}

/// A value the harness fills into a [`Template`] for each disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placeholder {
    /// `{socket}`: the vhost-user socket path to listen on.
    Socket,
    /// `{image}`: the image file.
    Image,
    /// `{writable}`: `on` or `off`.
    Writable,
    /// `{queues}`: the number of virtqueues.
    Queues,
}

/// One piece of a template word.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Text copied as it is.
    Text(String),
    /// A value filled in per disk.
    Value(Placeholder),
}

/// A backend command line with placeholders, e.g.
/// `qemu-storage-daemon --blockdev driver=file,node-name=f,filename={image} --export
/// type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={socket},writable={writable}`.
///
/// The text is split into words like a POSIX shell does (quotes and backslashes, no
/// expansions), then `{socket}`, `{image}`, `{writable}` (`on`/`off`) and `{queues}` are
/// replaced inside each word, so a value with spaces stays one word; `{{` and `}}` are
/// literal braces. Values are filled in as they are (no QEMU `,,` escaping).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    words: Vec<Vec<Piece>>,
}

impl Template {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let split = shlex::split(text).ok_or_else(|| TemplateError::Quoting(text.to_string()))?;
        if split.is_empty() {
            return Err(TemplateError::Empty);
        }
        let words = split
            .iter()
            .map(|w| parse_word(w))
            .collect::<Result<Vec<_>, _>>()?;
        let names_socket = words
            .iter()
            .flatten()
            .any(|p| *p == Piece::Value(Placeholder::Socket));
        if !names_socket {
            return Err(TemplateError::NoSocket);
        }
        Ok(Template {
            text: text.to_string(),
            words,
        })
    }

    /// The text it was parsed from.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The words with the values of `export` filled in; the first is the program.
    pub fn words(&self, export: &Export) -> Vec<String> {
        self.words
            .iter()
            .map(|pieces| {
                pieces
                    .iter()
                    .map(|p| match p {
                        Piece::Text(t) => t.clone(),
                        Piece::Value(Placeholder::Socket) => {
                            export.socket.to_string_lossy().into_owned()
                        }
                        Piece::Value(Placeholder::Image) => {
                            export.image.to_string_lossy().into_owned()
                        }
                        Piece::Value(Placeholder::Writable) => {
                            if export.read_only { "off" } else { "on" }.to_string()
                        }
                        Piece::Value(Placeholder::Queues) => export.queues.max(1).to_string(),
                    })
                    .collect()
            })
            .collect()
    }
}

impl std::str::FromStr for Template {
    type Err = TemplateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Template::parse(s)
    }
}

/// Splits one word into text and placeholders.
fn parse_word(word: &str) -> Result<Vec<Piece>, TemplateError> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut chars = word.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => name.push(c),
                        None => return Err(TemplateError::Brace(word.to_string())),
                    }
                }
                let value = match name.as_str() {
                    "socket" => Placeholder::Socket,
                    "image" => Placeholder::Image,
                    "writable" => Placeholder::Writable,
                    "queues" => Placeholder::Queues,
                    _ => return Err(TemplateError::Unknown(name)),
                };
                if !text.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut text)));
                }
                pieces.push(Piece::Value(value));
            }
            '}' => return Err(TemplateError::Brace(word.to_string())),
            c => text.push(c),
        }
    }
    if !text.is_empty() || pieces.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_errors_name_the_problem() {
        assert_eq!(Template::parse("  "), Err(TemplateError::Empty));
        assert!(matches!(
            Template::parse("b --s '{socket}"),
            Err(TemplateError::Quoting(_))
        ));
        assert_eq!(
            Template::parse("b {socket} {disk}"),
            Err(TemplateError::Unknown("disk".into()))
        );
        assert!(matches!(
            Template::parse("b {socket} {image"),
            Err(TemplateError::Brace(_))
        ));
        assert!(matches!(
            Template::parse("b {socket} x}"),
            Err(TemplateError::Brace(_))
        ));
        assert_eq!(Template::parse("b {image}"), Err(TemplateError::NoSocket));
        let msg = TemplateError::Unknown("disk".into()).to_string();
        assert!(msg.contains("{disk}") && msg.contains("{socket}"), "{msg}");
        assert_eq!(
            "b --socket-path={socket}"
                .parse::<Template>()
                .unwrap()
                .text(),
            "b --socket-path={socket}"
        );
    }
}
