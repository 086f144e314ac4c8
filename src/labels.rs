//! A pod's labels, kept compactly, and label selectors matched against them. Every pod of
//! the cluster is held with its labels, so they are a [`SmallMap`] (a pod has a few) rather
//! than the `BTreeMap` kube's `Selector` matches against, whose first node alone is about
//! 550 bytes. Selectors are parsed by kube (`TryFrom<LabelSelector>`) and matched here
//! with the same rules.

use kube::core::Expression;

use crate::small::SmallMap;

pub type Labels = SmallMap<String, String>;

/// A parsed label selector: every expression must match.
#[derive(Debug, Clone, PartialEq)]
pub struct Selector(Vec<Expression>);

impl From<kube::core::Selector> for Selector {
    fn from(s: kube::core::Selector) -> Selector {
        Selector(s.into_iter().collect())
    }
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|e| match e {
            Expression::In(key, values) => labels.get(key.as_str()).is_some_and(|v| values.contains(v)),
            Expression::NotIn(key, values) => labels.get(key.as_str()).is_none_or(|v| !values.contains(v)),
            Expression::Exists(key) => labels.contains_key(key.as_str()),
            Expression::DoesNotExist(key) => !labels.contains_key(key.as_str()),
            Expression::Equal(key, value) => labels.get(key.as_str()) == Some(value),
            Expression::NotEqual(key, value) => labels.get(key.as_str()) != Some(value),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use kube::core::SelectorExt;
    use serde_json::json;

    use super::*;

    /// Matches exactly as kube's own selector does, over every operator and label set.
    #[test]
    fn it_matches_as_kubes_selector_does() {
        let selectors = [
            json!({}),
            json!({"matchLabels": {"app": "web"}}),
            json!({"matchLabels": {"app": "web", "tier": "a"}}),
            json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "api"]}]}),
            json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["web"]}]}),
            json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}),
            json!({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}),
            json!({"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["b"]}]}),
        ];
        let label_sets: [&[(&str, &str)]; 6] = [&[], &[("app", "web")], &[("app", "api")], &[("app", "web"), ("tier", "a")], &[("tier", "b")], &[("app", "web"), ("tier", "b"), ("z", "1")]];
        let mut matched = 0;
        for sel in &selectors {
            let kube_sel = kube::core::Selector::try_from(serde_json::from_value::<LabelSelector>(sel.clone()).unwrap()).unwrap();
            let ours = Selector::from(kube_sel.clone());
            for set in label_sets {
                let tree: BTreeMap<String, String> = set.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                let small: Labels = tree.clone().into_iter().collect();
                assert_eq!(ours.matches(&small), kube_sel.matches(&tree), "{sel} on {set:?}");
                matched += usize::from(ours.matches(&small));
            }
        }
        // Neither all nor nothing: the sets tell the selectors apart.
        assert!(matched > 5 && matched < selectors.len() * label_sets.len(), "{matched}");
    }
}
