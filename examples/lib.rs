//! Shared pieces of the examples: the product catalogue they all use.

pub mod tour;

use serde::{Deserialize, Serialize};
use writethrough::Entity;

/// A product of the catalogue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Entity)]
#[writethrough(table = "products")]
pub struct Product {
    /// Its id, the key.
    pub id: i64,
    /// Its name.
    pub name: String,
    /// Its price.
    pub price: f64,
    /// How many are in stock.
    pub stock: i64,
}

/// Rejects what the catalogue must never hold.
pub fn validate(p: &Product) -> Result<(), String> {
    if p.name.trim().is_empty() {
        return Err("a product needs a name".into());
    }
    if p.price < 0.0 {
        return Err(format!("price {} is negative", p.price));
    }
    Ok(())
}

/// The bulk import of the walk-throughs: a thousand notebooks, ids 100 to 1099.
pub fn notebooks() -> Vec<Product> {
    (100..1100)
        .map(|id| Product {
            id,
            name: format!("Notebook #{id}"),
            price: 3.0 + (id % 7) as f64,
            stock: id % 50,
        })
        .collect()
}
