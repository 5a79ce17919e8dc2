//! Attribute filters of windows: which events a filtered window counts, by the optional
//! `attributes` events carry (e.g. leave gift cards out of the qualifying spend, or count only
//! the store channel).
//!
//! `only = { channel = ["store", "app"] }` counts an event only if, for every key listed, the
//! event has that attribute with one of the values; `exclude = { category = ["gift_card"] }`
//! leaves an event out if, for any key listed, its attribute has one of the values. An event
//! without the attribute is not counted by `only` and not excluded by `exclude`. Values match
//! exactly (case-sensitive).

/// A window's attribute filter; the default (nothing listed) counts every event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Keys whose value must be one of the listed values, sorted by key, values sorted.
    pub only: Vec<(String, Vec<String>)>,
    /// Keys whose listed values leave an event out, sorted by key, values sorted.
    pub exclude: Vec<(String, Vec<String>)>,
}

impl Filter {
    /// Whether the filter counts an event with these attributes.
    pub fn admits(&self, attributes: &[(String, String)]) -> bool {
        let value = |key: &str| {
            attributes
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        self.only.iter().all(|(key, values)| {
            value(key).is_some_and(|v| values.binary_search_by(|x| x.as_str().cmp(v)).is_ok())
        }) && !self.exclude.iter().any(|(key, values)| {
            value(key).is_some_and(|v| values.binary_search_by(|x| x.as_str().cmp(v)).is_ok())
        })
    }

    /// Whether the filter counts every event.
    pub fn is_empty(&self) -> bool {
        self.only.is_empty() && self.exclude.is_empty()
    }

    /// A canonical text of the filter (sorted keys and values), e.g.
    /// `only channel=app|store; exclude category=gift_card`: equal filters, equal text.
    pub fn describe(&self) -> String {
        let part = |name: &str, list: &[(String, Vec<String>)]| {
            list.iter()
                .map(|(k, vs)| format!("{name} {k}={}", vs.join("|")))
                .collect::<Vec<_>>()
        };
        let mut parts = part("only", &self.only);
        parts.extend(part("exclude", &self.exclude));
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn only_needs_every_key_and_exclude_any() {
        let f = Filter {
            only: vec![("channel".into(), vec!["app".into(), "store".into()])],
            exclude: vec![("category".into(), vec!["gift_card".into()])],
        };
        assert!(f.admits(&attrs(&[("channel", "store")])));
        assert!(f.admits(&attrs(&[("channel", "app"), ("category", "fuel")])));
        assert!(!f.admits(&attrs(&[("channel", "web")])));
        assert!(!f.admits(&attrs(&[])), "no channel: not counted by only");
        assert!(!f.admits(&attrs(&[("channel", "store"), ("category", "gift_card")])));
        assert!(!f.admits(&attrs(&[("channel", "Store")])), "exact match");
        let ex = Filter {
            only: Vec::new(),
            exclude: f.exclude.clone(),
        };
        assert!(ex.admits(&attrs(&[])), "no category: not excluded");
        assert!(!ex.admits(&attrs(&[("category", "gift_card")])));
        assert!(Filter::default().admits(&attrs(&[("category", "gift_card")])));
        assert_eq!(
            f.describe(),
            "only channel=app|store; exclude category=gift_card"
        );
    }
}
