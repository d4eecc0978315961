//! One trait per storage role, each with an embedded implementation (the
//! default, durable, no services) and, behind a cargo feature, a client of the
//! production service. [`open_log`] and its siblings build the one the
//! configuration names.

pub mod cache;
pub mod log;
pub mod objects;
pub mod search;
pub mod table;

use std::sync::Arc;

use crate::config::{
    CacheBackend, Config, LogBackend, ObjectsBackend, SearchBackend, TableBackend,
};

pub use cache::Cache;
pub use log::Log;
pub use objects::ObjectStore;
pub use search::SearchIndex;
pub use table::Table;

/// Opens the configured log.
pub fn open_log(config: &Config) -> Result<Arc<dyn Log>, log::LogError> {
    match config.log.backend {
        LogBackend::Embedded => Ok(Arc::new(log::EmbeddedLog::open(
            &config.data_dir.join("log"),
            config.log.embedded.clone(),
        )?)),
        LogBackend::Kafka => Err(log::LogError::FeatureDisabled {
            backend: "kafka",
            feature: "kafka",
        }),
    }
}

/// Opens the configured object store.
pub fn open_objects(config: &Config) -> Result<Arc<dyn ObjectStore>, objects::ObjectError> {
    match config.objects.backend {
        ObjectsBackend::Embedded => Ok(Arc::new(objects::EmbeddedObjects::open(
            &config.data_dir.join("objects"),
        )?)),
        ObjectsBackend::S3 => Err(objects::ObjectError::FeatureDisabled {
            backend: "s3",
            feature: "s3",
        }),
    }
}

/// Opens the configured table store.
pub fn open_table(config: &Config) -> Result<Arc<dyn Table>, table::TableError> {
    match config.table.backend {
        TableBackend::Embedded => Ok(Arc::new(table::EmbeddedTable::open(
            &config.data_dir.join("table.redb"),
        )?)),
        TableBackend::Hbase => Err(table::TableError::FeatureDisabled {
            backend: "hbase",
            feature: "hbase",
        }),
    }
}

/// Opens the configured search index.
pub fn open_search(config: &Config) -> Result<Arc<dyn SearchIndex>, search::SearchError> {
    match config.search.backend {
        SearchBackend::Embedded => Ok(Arc::new(search::EmbeddedSearch::open(
            &config.data_dir.join("search"),
        )?)),
        SearchBackend::Elasticsearch => Err(search::SearchError::FeatureDisabled {
            backend: "elasticsearch",
            feature: "elasticsearch",
        }),
    }
}

/// Opens the configured cache.
pub fn open_cache(config: &Config) -> Result<Arc<dyn Cache>, cache::CacheError> {
    match config.cache.backend {
        CacheBackend::Embedded => Ok(Arc::new(cache::EmbeddedCache::new(
            config.cache.max_entries,
        ))),
        CacheBackend::Redis => Err(cache::CacheError::FeatureDisabled {
            backend: "redis",
            feature: "redis",
        }),
    }
}
