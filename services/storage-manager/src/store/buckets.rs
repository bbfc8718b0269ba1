//! Bucket operations: listing, creating (durably), deleting.

use std::collections::BTreeMap;
use std::fs;

use s3::sigv4::hex;
use s3::timefmt;

use super::{io_err, random, sync_dir, valid_bucket_name, write_file_synced};
use super::{BucketEntry, Store, StoreError};

impl Store {
    /// Buckets with their creation times.
    pub fn list_buckets(&self) -> Vec<(String, u64)> {
        self.read_index()
            .buckets
            .iter()
            .map(|(n, b)| (n.clone(), b.created))
            .collect()
    }

    /// Does `bucket` exist?
    pub fn bucket_exists(&self, bucket: &str) -> bool {
        self.read_index().buckets.contains_key(bucket)
    }

    /// Creates a bucket (durably).
    pub fn create_bucket(&self, bucket: &str) -> Result<(), StoreError> {
        if !valid_bucket_name(bucket) {
            return Err(StoreError::InvalidBucketName(bucket.into()));
        }
        let mut idx = self.write_index();
        if idx.buckets.contains_key(bucket) {
            return Err(StoreError::BucketExists(bucket.into()));
        }
        let staging = self
            .root
            .join("tmp")
            .join(format!("bucket-{}", hex(&random::<8>()?)));
        for d in ["objects", "uploads"] {
            let p = staging.join(d);
            fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
        }
        let created = timefmt::now();
        write_file_synced(
            &staging.join("bucket.json"),
            serde_json::json!({ "created": created })
                .to_string()
                .as_bytes(),
        )?;
        sync_dir(&staging)?;
        let dest = self.bucket_dir(bucket);
        fs::rename(&staging, &dest).map_err(io_err("renaming into", &dest))?;
        sync_dir(&self.root.join("buckets"))?;
        idx.buckets.insert(
            bucket.into(),
            BucketEntry {
                created,
                objects: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Deletes an empty bucket (aborting its multipart uploads).
    pub fn delete_bucket(&self, bucket: &str) -> Result<(), StoreError> {
        let mut idx = self.write_index();
        match idx.buckets.get(bucket) {
            None => return Err(StoreError::NoSuchBucket(bucket.into())),
            Some(b) if !b.objects.is_empty() => {
                return Err(StoreError::BucketNotEmpty(bucket.into()))
            }
            Some(_) => {}
        }
        let dir = self.bucket_dir(bucket);
        let grave = self
            .root
            .join("tmp")
            .join(format!("deleted-{}", hex(&random::<8>()?)));
        fs::rename(&dir, &grave).map_err(io_err("renaming", &dir))?;
        sync_dir(&self.root.join("buckets"))?;
        idx.buckets.remove(bucket);
        drop(idx);
        if let Ok(mut u) = self.uploads.lock() {
            u.retain(|_, info| info.bucket != bucket);
        }
        let _ = fs::remove_dir_all(&grave);
        Ok(())
    }

    pub(super) fn check_bucket(&self, bucket: &str) -> Result<(), StoreError> {
        if self.bucket_exists(bucket) {
            Ok(())
        } else {
            Err(StoreError::NoSuchBucket(bucket.into()))
        }
    }
}
