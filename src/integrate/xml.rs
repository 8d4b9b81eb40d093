//! A small element tree over `quick-xml`, enough to edit a libvirt domain and write it back:
//! elements with their attributes and children; text, comments, CDATA, processing
//! instructions and the prolog are kept verbatim, so what is not edited comes out as it went in
//! (attribute quoting aside). Input is bounded by the caller (size) and here (depth, nodes).

use std::fmt::Write as _;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// Deepest element nesting accepted.
pub const MAX_DEPTH: usize = 64;
/// Most nodes accepted in one document.
pub const MAX_NODES: usize = 200_000;

/// A node of the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    /// An element.
    Element(Element),
    /// Anything else, as it was written (escaped text, `<!--...-->`, `<![CDATA[...]]>`, `<?...?>`,
    /// an entity reference).
    Raw(String),
}

/// An element: its qualified name, attributes (values unescaped) and children.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Element {
    /// Qualified name (`prefix:local` or `local`).
    pub name: String,
    /// Attributes in document order, values unescaped.
    pub attrs: Vec<(String, String)>,
    /// Children in document order.
    pub children: Vec<Node>,
}

/// A parsed document: what comes before the root (declaration, comments), the root, and what
/// follows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    /// Nodes before the root element.
    pub prolog: Vec<String>,
    /// The root element.
    pub root: Element,
    /// Nodes after the root element.
    pub epilog: Vec<String>,
}

/// Why a document could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    /// Not well-formed.
    #[error("not well-formed XML at byte {at}: {why}")]
    Syntax {
        /// Byte offset.
        at: u64,
        /// The parser's message.
        why: String,
    },
    /// No root element.
    #[error("no root element")]
    NoRoot,
    /// Deeper than [`MAX_DEPTH`] or more than [`MAX_NODES`] nodes.
    #[error("the document is nested deeper than {MAX_DEPTH} or has more than {MAX_NODES} nodes")]
    TooBig,
}

impl Element {
    /// An element with attributes and no children.
    pub fn new(name: &str, attrs: &[(&str, &str)]) -> Element {
        Element {
            name: name.to_string(),
            attrs: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            children: Vec::new(),
        }
    }

    /// The value of attribute `key`.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets attribute `key`.
    pub fn set_attr(&mut self, key: &str, value: &str) {
        match self.attrs.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value.to_string(),
            None => self.attrs.push((key.to_string(), value.to_string())),
        }
    }

    /// Child elements.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Raw(_) => None,
        })
    }

    /// The first child element named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.elements().find(|e| e.name == name)
    }

    /// The first child element named `name`, mutable.
    pub fn child_mut(&mut self, name: &str) -> Option<&mut Element> {
        self.children.iter_mut().find_map(|n| match n {
            Node::Element(e) if e.name == name => Some(e),
            _ => None,
        })
    }

    /// The text directly inside (raw, as written), concatenated.
    pub fn text(&self) -> String {
        self.children
            .iter()
            .filter_map(|n| match n {
                Node::Raw(t) if !t.starts_with('<') => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The indentation of this element's children, guessed from the whitespace before its
    /// first child element (two spaces deeper than `own` when it has none).
    fn child_indent(&self, own: &str) -> String {
        for pair in self.children.windows(2) {
            if let (Node::Raw(ws), Node::Element(_)) = (&pair[0], &pair[1]) {
                if let Some(i) = ws.rfind('\n') {
                    let tail = &ws[i + 1..];
                    if tail.chars().all(|c| c == ' ' || c == '\t') {
                        return tail.to_string();
                    }
                }
            }
        }
        format!("{own}  ")
    }

    /// Appends `child` after the last child element, on its own line, indented like its
    /// siblings; `own` is this element's own indentation.
    pub fn append(&mut self, child: Element, own: &str) {
        let indent = self.child_indent(own);
        let mut child = child;
        child.reindent(&indent);
        // Keep whatever closes this element (the newline before `</name>`) last.
        let tail = match self.children.last() {
            Some(Node::Raw(t)) if t.trim().is_empty() => self.children.pop(),
            _ => None,
        };
        self.children.push(Node::Raw(format!("\n{indent}")));
        self.children.push(Node::Element(child));
        self.children
            .push(tail.unwrap_or_else(|| Node::Raw(format!("\n{own}"))));
    }

    /// Lays out an element built here (children only elements) one per line under `indent`,
    /// one level deeper each: a tab where `indent` has tabs, else two spaces.
    fn reindent(&mut self, indent: &str) {
        if self.children.iter().all(|n| matches!(n, Node::Element(_))) && !self.children.is_empty()
        {
            let unit = if indent.contains('\t') { "\t" } else { "  " };
            let inner = format!("{indent}{unit}");
            let kids: Vec<Node> = std::mem::take(&mut self.children);
            for k in kids {
                if let Node::Element(mut e) = k {
                    e.reindent(&inner);
                    self.children.push(Node::Raw(format!("\n{inner}")));
                    self.children.push(Node::Element(e));
                }
            }
            self.children.push(Node::Raw(format!("\n{indent}")));
        }
    }

    fn write(&self, out: &mut String) {
        out.push('<');
        out.push_str(&self.name);
        for (k, v) in &self.attrs {
            let _ = write!(out, " {k}='{}'", escape_attr(v));
        }
        if self.children.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        for c in &self.children {
            match c {
                Node::Element(e) => e.write(out),
                Node::Raw(r) => out.push_str(r),
            }
        }
        let _ = write!(out, "</{}>", self.name);
    }
}

/// Escapes an attribute value for single quotes.
fn escape_attr(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '&' => s.push_str("&amp;"),
            '<' => s.push_str("&lt;"),
            '>' => s.push_str("&gt;"),
            '\'' => s.push_str("&apos;"),
            '\n' => s.push_str("&#10;"),
            '\t' => s.push_str("&#9;"),
            '\r' => s.push_str("&#13;"),
            c => s.push(c),
        }
    }
    s
}

/// Whether `s` is an XML name (`NameStartChar NameChar*`, with every non-ASCII character
/// allowed: a superset of XML 1.0's, enough to refuse what cannot be written back).
pub fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_' || c == ':' || !c.is_ascii())
        && chars.all(|c| c.is_alphanumeric() || matches!(c, '-' | '.' | '_' | ':') || !c.is_ascii())
}

fn start_element(b: &BytesStart<'_>) -> Result<Element, String> {
    let name = b.name().into_inner().to_string();
    if !is_name(&name) {
        return Err(format!("{name:?} is not an element name"));
    }
    let mut attrs = Vec::new();
    for a in b.attributes() {
        let a = a.map_err(|e| e.to_string())?;
        let key = a.key.into_inner().to_string();
        if !is_name(&key) {
            return Err(format!("{key:?} is not an attribute name"));
        }
        if attrs.iter().any(|(k, _)| *k == key) {
            return Err(format!("attribute {key} repeated"));
        }
        let value = a
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|e| e.to_string())?
            .into_owned();
        attrs.push((key, value));
    }
    Ok(Element {
        name,
        attrs,
        children: Vec::new(),
    })
}

/// Parses `xml` into a tree.
pub fn parse(xml: &str) -> Result<Document, XmlError> {
    let mut reader = Reader::from_str(xml);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<Element> = Vec::new();
    let mut prolog = Vec::new();
    let mut epilog = Vec::new();
    let mut root: Option<Element> = None;
    let mut nodes = 0usize;
    loop {
        let at = reader.buffer_position();
        let ev = reader.read_event().map_err(|e| XmlError::Syntax {
            at,
            why: e.to_string(),
        })?;
        nodes += 1;
        if nodes > MAX_NODES {
            return Err(XmlError::TooBig);
        }
        let syntax = |why: String| XmlError::Syntax { at, why };
        // Everything that is not an element goes verbatim where it stands.
        let raw = match &ev {
            Event::Text(t) => Some(t[..].to_string()),
            Event::GeneralRef(r) => Some(format!("&{};", &r[..])),
            Event::Comment(t) => Some(format!("<!--{}-->", &t[..])),
            Event::CData(t) => Some(format!("<![CDATA[{}]]>", &t[..])),
            Event::PI(t) => Some(format!("<?{}?>", &t[..])),
            Event::Decl(d) => Some(format!("<?{}?>", &d[..])),
            Event::DocType(t) => Some(format!("<!DOCTYPE {}>", &t[..])),
            _ => None,
        };
        if let Some(raw) = raw {
            match stack.last_mut() {
                Some(parent) => parent.children.push(Node::Raw(raw)),
                None if root.is_none() => prolog.push(raw),
                None => epilog.push(raw),
            }
            continue;
        }
        match ev {
            Event::Start(b) => {
                if root.is_some() && stack.is_empty() {
                    return Err(syntax("a second root element".into()));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooBig);
                }
                stack.push(start_element(&b).map_err(syntax)?);
            }
            Event::Empty(b) => {
                let e = start_element(&b).map_err(syntax)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(Node::Element(e)),
                    None if root.is_none() => root = Some(e),
                    None => return Err(syntax("a second root element".into())),
                }
            }
            Event::End(_) => {
                let e = stack
                    .pop()
                    .ok_or_else(|| syntax("an unmatched end tag".into()))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(Node::Element(e)),
                    None => root = Some(e),
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !stack.is_empty() {
        return Err(XmlError::Syntax {
            at: reader.buffer_position(),
            why: format!("<{}> is not closed", stack[stack.len() - 1].name),
        });
    }
    Ok(Document {
        prolog,
        root: root.ok_or(XmlError::NoRoot)?,
        epilog,
    })
}

impl Document {
    /// The document as text.
    pub fn write(&self) -> String {
        let mut out = String::new();
        for p in &self.prolog {
            out.push_str(p);
        }
        self.root.write(&mut out);
        for p in &self.epilog {
            out.push_str(p);
        }
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_comes_back_as_it_went_in_apart_from_quotes() {
        let xml = "<?xml version=\"1.0\"?>\n<!-- top -->\n<domain type='kvm' a=\"x &amp; &lt;y&gt; 'q'\">\n  \
                   <name>a &amp; b</name>\n  <![CDATA[<raw>]]>\n  <?pi x?>\n  <devices/>\n</domain>\n";
        let d = parse(xml).unwrap();
        assert_eq!(d.root.attr("a"), Some("x & <y> 'q'"));
        assert_eq!(d.root.child("name").unwrap().text(), "a &amp; b");
        let back = d.write();
        assert_eq!(
            back,
            "<?xml version=\"1.0\"?>\n<!-- top -->\n<domain type='kvm' a='x &amp; &lt;y&gt; &apos;q&apos;'>\n  \
             <name>a &amp; b</name>\n  <![CDATA[<raw>]]>\n  <?pi x?>\n  <devices/>\n</domain>\n"
        );
        assert_eq!(
            parse(&back).unwrap(),
            d,
            "a second round trip changes nothing"
        );
    }

    #[test]
    fn malformed_and_oversized_documents_are_refused() {
        for bad in [
            "",
            "<a>",
            "<a></b>",
            "<a/><b/>",
            "<a x='1' x='2'/>",
            "<a x='&bogus;'/>",
            "text only",
            "<a>< /></a>",
            "<a 1x='1'/>",
            "<a x)='1'/>",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let deep = "<a>".repeat(MAX_DEPTH + 1) + &"</a>".repeat(MAX_DEPTH + 1);
        assert_eq!(parse(&deep), Err(XmlError::TooBig));
    }

    #[test]
    fn appended_children_are_indented_like_their_siblings() {
        let mut d = parse("<domain>\n    <name>x</name>\n</domain>").unwrap();
        let mut mb = Element::new("memoryBacking", &[]);
        mb.children
            .push(Node::Element(Element::new("source", &[("type", "memfd")])));
        d.root.append(mb, "");
        assert_eq!(
            d.write(),
            "<domain>\n    <name>x</name>\n    <memoryBacking>\n      <source type='memfd'/>\n    </memoryBacking>\n</domain>\n"
        );
        // Tabs (Go's encoding/xml, as KubeVirt writes domains) stay tabs.
        let mut d = parse("<domain>\n\t<name>x</name>\n</domain>").unwrap();
        let mut mb = Element::new("memoryBacking", &[]);
        mb.children
            .push(Node::Element(Element::new("source", &[("type", "memfd")])));
        d.root.append(mb, "");
        assert_eq!(
            d.write(),
            "<domain>\n\t<name>x</name>\n\t<memoryBacking>\n\t\t<source type='memfd'/>\n\t</memoryBacking>\n</domain>\n"
        );
    }
}
