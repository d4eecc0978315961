//! `log.topic_prefix`: a namespace on a shared log. Every topic and consumer
//! group name gets the prefix on the way in and loses it on the way out, so
//! several sift deployments (or test runs) can share one Kafka cluster
//! without seeing each other's records or offsets. Topics without the
//! prefix are invisible to `list_topics`.

use std::time::Duration;

use async_trait::async_trait;

use super::{
    Commit, Consumer, Log, LogError, Message, Offset, Position, TopicInfo, TopicPartition,
    Watermarks,
};

/// A log whose topic and group names carry a prefix.
pub struct PrefixedLog {
    inner: std::sync::Arc<dyn Log>,
    prefix: String,
}

impl PrefixedLog {
    /// Wraps `inner`; `prefix` must make valid topic and group names.
    pub fn new(inner: std::sync::Arc<dyn Log>, prefix: &str) -> Self {
        PrefixedLog {
            inner,
            prefix: prefix.to_string(),
        }
    }

    fn name(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }
}

/// `name` without `prefix` (names that lack it are left as they are).
fn strip(prefix: &str, name: String) -> String {
    match name.strip_prefix(prefix) {
        Some(rest) => rest.to_string(),
        None => name,
    }
}

fn strip_messages(prefix: &str, messages: Vec<Message>) -> Vec<Message> {
    messages
        .into_iter()
        .map(|mut m| {
            m.topic = strip(prefix, std::mem::take(&mut m.topic));
            m
        })
        .collect()
}

fn prefixed_commits(prefix: &str, commits: &[Commit]) -> Vec<Commit> {
    commits
        .iter()
        .map(|c| Commit {
            topic: format!("{prefix}{}", c.topic),
            ..c.clone()
        })
        .collect()
}

#[async_trait]
impl Log for PrefixedLog {
    async fn create_topic(&self, topic: &str, partitions: u32) -> Result<bool, LogError> {
        self.inner.create_topic(&self.name(topic), partitions).await
    }

    async fn list_topics(&self) -> Result<Vec<TopicInfo>, LogError> {
        Ok(self
            .inner
            .list_topics()
            .await?
            .into_iter()
            .filter(|t| t.name.starts_with(&self.prefix))
            .map(|mut t| {
                t.name = strip(&self.prefix, std::mem::take(&mut t.name));
                t
            })
            .collect())
    }

    async fn produce(
        &self,
        topic: &str,
        records: Vec<super::Record>,
    ) -> Result<Vec<Position>, LogError> {
        self.inner.produce(&self.name(topic), records).await
    }

    async fn watermarks(&self, topic: &str) -> Result<Vec<Watermarks>, LogError> {
        self.inner.watermarks(&self.name(topic)).await
    }

    async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: &Offset,
        max: usize,
    ) -> Result<Vec<Message>, LogError> {
        let m = self
            .inner
            .fetch(&self.name(topic), partition, offset, max)
            .await?;
        Ok(strip_messages(&self.prefix, m))
    }

    async fn count(
        &self,
        topic: &str,
        partition: u32,
        from: &Offset,
        to: &Offset,
    ) -> Result<u64, LogError> {
        self.inner
            .count(&self.name(topic), partition, from, to)
            .await
    }

    async fn subscribe(&self, group: &str, topics: &[&str]) -> Result<Box<dyn Consumer>, LogError> {
        let names: Vec<String> = topics.iter().map(|t| self.name(t)).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let inner = self.inner.subscribe(&self.name(group), &refs).await?;
        Ok(Box::new(PrefixedConsumer {
            inner,
            prefix: self.prefix.clone(),
        }))
    }

    async fn committed(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Vec<(u32, Option<Offset>)>, LogError> {
        self.inner
            .committed(&self.name(group), &self.name(topic))
            .await
    }

    async fn set_committed(&self, group: &str, commits: &[Commit]) -> Result<(), LogError> {
        self.inner
            .set_committed(&self.name(group), &prefixed_commits(&self.prefix, commits))
            .await
    }
}

/// A group member of a [`PrefixedLog`].
struct PrefixedConsumer {
    inner: Box<dyn Consumer>,
    prefix: String,
}

#[async_trait]
impl Consumer for PrefixedConsumer {
    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Message>, LogError> {
        let m = self.inner.poll(max, timeout).await?;
        Ok(strip_messages(&self.prefix, m))
    }

    async fn commit(&mut self, commits: &[Commit]) -> Result<(), LogError> {
        self.inner
            .commit(&prefixed_commits(&self.prefix, commits))
            .await
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.inner
            .assignment()
            .into_iter()
            .map(|mut tp| {
                tp.topic = strip(&self.prefix, std::mem::take(&mut tp.topic));
                tp
            })
            .collect()
    }

    async fn close(self: Box<Self>) -> Result<(), LogError> {
        self.inner.close().await
    }
}
