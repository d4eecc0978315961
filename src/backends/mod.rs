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

/// The `log.on_*` policies of `config`, for the embedded log.
pub fn log_policies(config: &Config) -> log::embedded::Policies {
    log::embedded::Policies {
        on_offset_out_of_range: config.log.on_offset_out_of_range,
        on_corruption: config.log.on_corruption,
        dlq_partitions: config.log.default_partitions,
    }
}

/// Opens the configured log.
pub async fn open_log(config: &Config) -> Result<Arc<dyn Log>, log::LogError> {
    open_log_as(config, false).await
}

/// Opens the configured log for a command that only reads it: the embedded
/// log is opened without its lock (beside a running daemon) and no file is
/// changed, damaged ones included.
pub async fn open_log_read_only(config: &Config) -> Result<Arc<dyn Log>, log::LogError> {
    open_log_as(config, true).await
}

async fn open_log_as(config: &Config, read_only: bool) -> Result<Arc<dyn Log>, log::LogError> {
    let log = open_backend_log(config, read_only).await?;
    let prefix = &config.log.topic_prefix;
    if prefix.is_empty() {
        return Ok(log);
    }
    log::validate_name("log.topic_prefix", prefix)?;
    Ok(Arc::new(log::prefixed::PrefixedLog::new(log, prefix)))
}

async fn open_backend_log(config: &Config, read_only: bool) -> Result<Arc<dyn Log>, log::LogError> {
    match config.log.backend {
        LogBackend::Embedded if read_only => Ok(Arc::new(log::EmbeddedLog::open_read_only(
            &config.data_dir.join("log"),
            config.log.embedded.clone(),
        )?)),
        LogBackend::Embedded => Ok(Arc::new(log::EmbeddedLog::open_with(
            &config.data_dir.join("log"),
            config.log.embedded.clone(),
            log_policies(config),
        )?)),
        #[cfg(feature = "kafka")]
        LogBackend::Kafka => Ok(Arc::new(
            log::kafka::KafkaLog::connect(&config.log.kafka).await?,
        )),
        #[cfg(not(feature = "kafka"))]
        LogBackend::Kafka => Err(log::LogError::FeatureDisabled {
            backend: "kafka",
            feature: "kafka",
        }),
        #[cfg(feature = "kinesis")]
        LogBackend::Kinesis => Ok(Arc::new(
            log::kinesis::KinesisLog::connect(&config.log.kinesis).await?,
        )),
        #[cfg(not(feature = "kinesis"))]
        LogBackend::Kinesis => Err(log::LogError::FeatureDisabled {
            backend: "kinesis",
            feature: "kinesis",
        }),
    }
}

/// Opens the configured object store.
pub async fn open_objects(config: &Config) -> Result<Arc<dyn ObjectStore>, objects::ObjectError> {
    match config.objects.backend {
        ObjectsBackend::Embedded => Ok(Arc::new(objects::EmbeddedObjects::open(
            &config.data_dir.join("objects"),
        )?)),
        #[cfg(feature = "s3")]
        ObjectsBackend::S3 => Ok(Arc::new(
            objects::s3::S3Objects::connect(&config.objects.s3).await?,
        )),
        #[cfg(not(feature = "s3"))]
        ObjectsBackend::S3 => Err(objects::ObjectError::FeatureDisabled {
            backend: "s3",
            feature: "s3",
        }),
    }
}

/// Opens the configured table store.
pub async fn open_table(config: &Config) -> Result<Arc<dyn Table>, table::TableError> {
    match config.table.backend {
        TableBackend::Embedded => Ok(Arc::new(table::EmbeddedTable::open(
            &config.data_dir.join("table.redb"),
        )?)),
        #[cfg(feature = "hbase")]
        TableBackend::Hbase => Ok(Arc::new(
            table::hbase::HbaseTable::connect(&config.table.hbase).await?,
        )),
        #[cfg(not(feature = "hbase"))]
        TableBackend::Hbase => Err(table::TableError::FeatureDisabled {
            backend: "hbase",
            feature: "hbase",
        }),
    }
}

/// Opens the configured search index.
pub async fn open_search(config: &Config) -> Result<Arc<dyn SearchIndex>, search::SearchError> {
    match config.search.backend {
        SearchBackend::Embedded => Ok(Arc::new(search::EmbeddedSearch::open(
            &config.data_dir.join("search"),
        )?)),
        #[cfg(feature = "elasticsearch")]
        SearchBackend::Elasticsearch => Ok(Arc::new(
            search::elasticsearch::ElasticsearchIndex::connect(&config.search.elasticsearch)
                .await?,
        )),
        #[cfg(not(feature = "elasticsearch"))]
        SearchBackend::Elasticsearch => Err(search::SearchError::FeatureDisabled {
            backend: "elasticsearch",
            feature: "elasticsearch",
        }),
    }
}

/// Opens the configured cache.
pub async fn open_cache(config: &Config) -> Result<Arc<dyn Cache>, cache::CacheError> {
    match config.cache.backend {
        CacheBackend::Embedded => Ok(Arc::new(cache::EmbeddedCache::new(
            config.cache.max_entries,
        ))),
        #[cfg(feature = "redis")]
        CacheBackend::Redis => Ok(Arc::new(
            cache::redis::RedisCache::connect(&config.cache.redis_url).await?,
        )),
        #[cfg(not(feature = "redis"))]
        CacheBackend::Redis => Err(cache::CacheError::FeatureDisabled {
            backend: "redis",
            feature: "redis",
        }),
    }
}
