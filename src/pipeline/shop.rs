//! The shop stage: offers for every recommended category at once; failures become warnings.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use super::plan::Category;
use crate::core::{Recommendation, RecommendationReason};
use crate::shopping::ShoppingProvider;

/// What the lookups found.
pub struct Shopped {
    /// Offers per category that answered.
    pub recommendations: Vec<Recommendation>,
    /// One line per category whose lookup failed.
    pub warnings: Vec<String>,
    /// When the lookups started.
    pub started: SystemTime,
    /// How long the lookups took, in ms.
    pub ms: f64,
}

/// One category to shop for.
pub struct Lookup {
    /// The category.
    pub category: Category,
    /// Why it is recommended.
    pub reason: RecommendationReason,
    /// The searches to try in turn until one finds offers: the branded query, then the plain one.
    pub queries: Vec<String>,
}

/// Looks up every category at once, keeping `per_category` offers of each.
pub async fn shop(provider: Arc<dyn ShoppingProvider>, lookups: Vec<Lookup>, per_category: usize) -> Shopped {
    let (started, at) = (Instant::now(), SystemTime::now());
    let lookups = lookups.into_iter().map(|Lookup { category, reason, queries }| {
        let provider = provider.clone();
        async move {
            let mut found = Ok(Vec::new());
            for query in &queries {
                found = provider.search(query, per_category).await;
                if !matches!(&found, Ok(offers) if offers.is_empty()) {
                    break;
                }
            }
            (category, reason, found)
        }
    });
    let mut recommendations = Vec::new();
    let mut warnings = Vec::new();
    for (category, reason, found) in futures::future::join_all(lookups).await {
        match found {
            Ok(mut offers) => {
                offers.truncate(per_category);
                recommendations.push(Recommendation {
                    reason,
                    category: category.id.clone(),
                    display_name: category.display.clone(),
                    items: offers,
                });
            }
            Err(e) => warnings.push(format!("Shopping lookup for {} failed: {e}", category.display)),
        }
    }
    Shopped { recommendations, warnings, started: at, ms: started.elapsed().as_secs_f64() * 1000.0 }
}
