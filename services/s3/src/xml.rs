//! The little XML S3 needs: escaping for the answers, and a reader for the
//! few flat documents clients send (`CompleteMultipartUpload`,
//! `Delete`) and the client reads (listings, errors).
//!
//! Limits of the reader: elements are found by local name (a namespace
//! prefix is ignored), text is unescaped for the five predefined entities
//! and numeric character references; CDATA sections, comments inside the
//! searched elements and nested elements of the same name are not
//! supported (S3 documents have none of these).

/// Escapes text for an element body or attribute. Characters XML 1.0
/// cannot carry (controls other than tab, CR, LF) become `&#xN;`-free
/// U+FFFD so the document always parses; use `encoding-type=url` for such
/// keys.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// Reverses [`escape`] (and numeric references); `None` on a malformed entity.
pub fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let end = rest[i..].find(';')? + i;
        let ent = &rest[i + 1..end];
        match ent {
            "amp" => out.push('&'),
            "lt" => out.push('<'),
            "gt" => out.push('>'),
            "quot" => out.push('"'),
            "apos" => out.push('\''),
            _ => {
                let n = if let Some(h) = ent.strip_prefix("#x").or_else(|| ent.strip_prefix("#X")) {
                    u32::from_str_radix(h, 16).ok()?
                } else {
                    ent.strip_prefix('#')?.parse().ok()?
                };
                out.push(char::from_u32(n)?);
            }
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// Finds the start of an opening tag `<name>` / `<name ...>` / `<p:name>`
/// at or after `from`; returns (start of the tag, index after `>`, whether
/// it was self-closing).
fn find_open(doc: &str, name: &str, from: usize) -> Option<(usize, usize, bool)> {
    let mut pos = from;
    while let Some(i) = doc.get(pos..)?.find('<') {
        let start = pos + i;
        let after = &doc[start + 1..];
        let tag_end = after.find('>')? + start + 1;
        let inner = &doc[start + 1..tag_end];
        let self_closing = inner.ends_with('/');
        let tag_name = inner
            .trim_end_matches('/')
            .split(|c: char| c.is_whitespace())
            .next()
            .unwrap_or("");
        let local = tag_name.rsplit(':').next().unwrap_or(tag_name);
        if local == name && !tag_name.starts_with('/') && !tag_name.starts_with('?') {
            return Some((start, tag_end + 1, self_closing));
        }
        pos = tag_end + 1;
    }
    None
}

fn find_close(doc: &str, name: &str, from: usize) -> Option<(usize, usize)> {
    let mut pos = from;
    while let Some(i) = doc.get(pos..)?.find("</") {
        let start = pos + i;
        let tag_end = doc[start..].find('>')? + start;
        let tag_name = doc[start + 2..tag_end].trim();
        let local = tag_name.rsplit(':').next().unwrap_or(tag_name);
        if local == name {
            return Some((start, tag_end + 1));
        }
        pos = tag_end + 1;
    }
    None
}

/// The raw inner text of every `<name>…</name>` element, in order.
pub fn elements<'a>(doc: &'a str, name: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some((_, body_start, self_closing)) = find_open(doc, name, pos) {
        if self_closing {
            out.push("");
            pos = body_start;
            continue;
        }
        match find_close(doc, name, body_start) {
            Some((close_start, close_end)) => {
                out.push(&doc[body_start..close_start]);
                pos = close_end;
            }
            None => break,
        }
    }
    out
}

/// The unescaped text of the first `<name>` element.
pub fn text(doc: &str, name: &str) -> Option<String> {
    elements(doc, name).first().and_then(|t| unescape(t.trim()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests: a panic is a failure report

    use super::*;

    #[test]
    fn escape_round_trip_and_elements() {
        let s = "a<b>&\"c'\u{1}";
        assert_eq!(unescape(&escape(s)).unwrap(), "a<b>&\"c'\u{FFFD}");
        assert_eq!(unescape("&#x41;&#66;").unwrap(), "AB");
        assert_eq!(unescape("&bogus;"), None);
        let doc = r#"<?xml version="1.0"?><CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
            <Part><PartNumber>1</PartNumber><ETag>"a&amp;b"</ETag></Part>
            <Part><ETag>x</ETag><PartNumber>2</PartNumber><ChecksumCRC32/></Part>
        </CompleteMultipartUpload>"#;
        let parts = elements(doc, "Part");
        assert_eq!(parts.len(), 2);
        assert_eq!(text(parts[0], "ETag").unwrap(), "\"a&b\"");
        assert_eq!(text(parts[1], "PartNumber").unwrap(), "2");
        assert_eq!(elements(parts[1], "ChecksumCRC32"), [""]);
        assert!(elements("<a><b>unclosed", "b").is_empty());
        assert!(elements("", "b").is_empty());
        assert_eq!(text("<s3:Key>k</s3:Key>", "Key").unwrap(), "k");
    }
}
