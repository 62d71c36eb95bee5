//! One parser for the comma-separated device option strings
//! (`--disk PATH,ro,id=NAME`, `--net tap=NAME,mac=MAC`, `--vsock
//! cid=N,socket=PATH`), so every device option is read, and refused, the
//! same way: one line naming the item at fault and the expected form.

/// The form of one kind of option string.
#[derive(Debug)]
pub struct OptionSyntax {
    /// The whole form, for error messages: `PATH[,ro][,id=NAME]`.
    pub usage: &'static str,
    /// The first item is a bare value (a disk's PATH), not an option.
    pub leading_value: bool,
    /// Keys written `key=value`.
    pub values: &'static [&'static str],
    /// Keys written alone (`ro`).
    pub flags: &'static [&'static str],
}

/// An option string split into its items; each key appears at most once.
#[derive(Debug)]
pub struct Options<'a> {
    syntax: &'static OptionSyntax,
    leading: Option<&'a str>,
    items: Vec<(&'a str, Option<&'a str>)>,
}

impl OptionSyntax {
    /// Splits `text` at commas and checks every item against the syntax:
    /// known keys only, each once, values only where a key takes one.
    pub fn parse<'a>(&'static self, text: &'a str) -> Result<Options<'a>, String> {
        let mut parts = text.split(',');
        let leading = match self.leading_value {
            true => match parts.next() {
                Some(value) if !value.is_empty() => Some(value),
                _ => return Err(self.error("missing the leading value")),
            },
            false => None,
        };
        let mut items: Vec<(&str, Option<&str>)> = Vec::new();
        for part in parts {
            let (key, value) = match part.split_once('=') {
                Some((key, value)) => (key.trim(), Some(value)),
                None => (part.trim(), None),
            };
            let known = match value {
                Some(_) => self.values.contains(&key),
                None => self.flags.contains(&key),
            };
            if part.trim().is_empty() {
                return Err(self.error("empty option"));
            }
            if !known {
                return Err(self.error(&format!("unknown option '{part}'")));
            }
            if items.iter().any(|(k, _)| *k == key) {
                return Err(self.error(&format!("option '{key}' given twice")));
            }
            items.push((key, value));
        }
        Ok(Options {
            syntax: self,
            leading,
            items,
        })
    }

    fn error(&self, what: &str) -> String {
        format!("{what} (expected {})", self.usage)
    }
}

impl<'a> Options<'a> {
    /// The leading value (present whenever the syntax has one).
    pub fn leading(&self) -> &'a str {
        self.leading.unwrap_or_default()
    }

    /// Whether the flag `key` was given.
    pub fn flag(&self, key: &str) -> bool {
        self.items.iter().any(|(k, v)| *k == key && v.is_none())
    }

    /// The value of `key`, if given.
    pub fn value(&self, key: &str) -> Option<&'a str> {
        self.items
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| *v)
    }

    /// The value of `key`, which must be given.
    pub fn required(&self, key: &str) -> Result<&'a str, String> {
        self.value(key)
            .ok_or_else(|| self.syntax.error(&format!("missing {key}=")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static SYNTAX: OptionSyntax = OptionSyntax {
        usage: "PATH[,ro][,id=NAME]",
        leading_value: true,
        values: &["id"],
        flags: &["ro"],
    };
    static KEYS_ONLY: OptionSyntax = OptionSyntax {
        usage: "cid=N,socket=PATH",
        leading_value: false,
        values: &["cid", "socket"],
        flags: &[],
    };

    #[test]
    fn splits_the_leading_value_flags_and_values() {
        let o = SYNTAX.parse("a.img,id=x=y,ro").unwrap();
        assert_eq!((o.leading(), o.flag("ro")), ("a.img", true));
        assert_eq!(o.value("id"), Some("x=y"), "only the first '=' splits");
        let o = SYNTAX.parse("a.img").unwrap();
        assert!(!o.flag("ro") && o.value("id").is_none());
        let o = KEYS_ONLY.parse("socket=/s, cid=3").unwrap();
        assert_eq!(
            (o.required("cid"), o.required("socket")),
            (Ok("3"), Ok("/s"))
        );
    }

    #[test]
    fn every_error_is_one_line_naming_the_item_and_the_form() {
        for (syntax, text, needle) in [
            (&SYNTAX, "", "missing the leading value"),
            (&SYNTAX, ",ro", "missing the leading value"),
            (&SYNTAX, "x,", "empty option"),
            (&SYNTAX, "x,bogus=1", "unknown option 'bogus=1'"),
            (&SYNTAX, "x,ro=1", "unknown option 'ro=1'"),
            (&SYNTAX, "x,id", "unknown option 'id'"),
            (&SYNTAX, "x,ro,ro", "option 'ro' given twice"),
            (&KEYS_ONLY, "cid=3,cid=4", "option 'cid' given twice"),
            (&KEYS_ONLY, "3,/s", "unknown option '3'"),
        ] {
            let e = syntax.parse(text).unwrap_err();
            assert!(e.starts_with(needle), "{text}: {e}");
            assert!(e.ends_with(&format!("(expected {})", syntax.usage)), "{e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let e = KEYS_ONLY.parse("cid=3").unwrap().required("socket");
        assert_eq!(
            e,
            Err("missing socket= (expected cid=N,socket=PATH)".into())
        );
    }
}
