//! [`object_store_changing_puts!`]: the `ObjectStore` impl of a wrapper that changes only how
//! objects are put (conditional updates, direct writes), with every other method passed
//! straight to its `inner` store.

/// `object_store_changing_puts!(Wrapper { async fn put_opts(...) {...} })` implements
/// `ObjectStore` for `Wrapper`, which must have an `inner` field holding an `ObjectStore`;
/// `... } deletes { fn delete_stream(...) {...} })` replaces how it deletes too.
macro_rules! object_store_changing_puts {
    ($wrapper:ty { $($put_opts:tt)* }) => {
        object_store_changing_puts!($wrapper { $($put_opts)* } deletes {
            fn delete_stream(
                &self,
                locations: futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>>,
            ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>> {
                self.inner.delete_stream(locations)
            }
        });
    };
    // With its own `delete_stream` as well.
    ($wrapper:ty { $($put_opts:tt)* } deletes { $($deletes:tt)* }) => {
        #[async_trait::async_trait]
        impl object_store::ObjectStore for $wrapper {
            $($put_opts)*
            $($deletes)*

            async fn put_multipart_opts(
                &self,
                location: &object_store::path::Path,
                opts: object_store::PutMultipartOptions,
            ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
                self.inner.put_multipart_opts(location, opts).await
            }

            async fn get_opts(
                &self,
                location: &object_store::path::Path,
                options: object_store::GetOptions,
            ) -> object_store::Result<object_store::GetResult> {
                self.inner.get_opts(location, options).await
            }

            async fn get_ranges(
                &self,
                location: &object_store::path::Path,
                ranges: &[std::ops::Range<u64>],
            ) -> object_store::Result<Vec<bytes::Bytes>> {
                self.inner.get_ranges(location, ranges).await
            }

            fn list(
                &self,
                prefix: Option<&object_store::path::Path>,
            ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
                self.inner.list(prefix)
            }

            fn list_with_offset(
                &self,
                prefix: Option<&object_store::path::Path>,
                offset: &object_store::path::Path,
            ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
                self.inner.list_with_offset(prefix, offset)
            }

            async fn list_with_delimiter(
                &self,
                prefix: Option<&object_store::path::Path>,
            ) -> object_store::Result<object_store::ListResult> {
                self.inner.list_with_delimiter(prefix).await
            }

            async fn copy_opts(
                &self,
                from: &object_store::path::Path,
                to: &object_store::path::Path,
                options: object_store::CopyOptions,
            ) -> object_store::Result<()> {
                self.inner.copy_opts(from, to, options).await
            }

            async fn rename_opts(
                &self,
                from: &object_store::path::Path,
                to: &object_store::path::Path,
                options: object_store::RenameOptions,
            ) -> object_store::Result<()> {
                self.inner.rename_opts(from, to, options).await
            }
        }
    };
}
