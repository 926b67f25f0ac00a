// flowdb's managed local Neo4j: the community DBMS run embedded with its Bolt
// connector on loopback, so drivers reach it exactly like a server install.
// Run as a single-file source program:
//   java -cp "lib/*" FlowdbNeo4j.java HOME PORT PAGECACHE_BYTES PASSWORD_FILE IMPORT_DIR
// The password is read from PASSWORD_FILE, never passed on the command line.
import inet.ipaddr.IPAddressString;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import org.neo4j.configuration.GraphDatabaseInternalSettings;
import org.neo4j.configuration.GraphDatabaseSettings;
import org.neo4j.configuration.connectors.BoltConnector;
import org.neo4j.configuration.connectors.BoltConnectorInternalSettings;
import org.neo4j.configuration.helpers.SocketAddress;
import org.neo4j.dbms.api.DatabaseManagementService;
import org.neo4j.dbms.api.DatabaseManagementServiceBuilder;
import org.neo4j.internal.kernel.api.connectioninfo.ClientConnectionInfo;
import org.neo4j.internal.kernel.api.security.AuthenticationResult;
import org.neo4j.kernel.api.security.AuthManager;
import org.neo4j.kernel.api.security.AuthToken;
import org.neo4j.kernel.internal.GraphDatabaseAPI;

public class FlowdbNeo4j {
    public static void main(String[] args) throws Exception {
        Path home = Path.of(args[0]);
        int port = Integer.parseInt(args[1]);
        long pageCache = Long.parseLong(args[2]);
        String password = Files.readString(Path.of(args[3])).strip();
        Path importDir = Path.of(args[4]);

        // Phase 1, Bolt off: nobody can connect while the user neo4j still has
        // the default password neo4j/neo4j (fresh DBMS, or one from before auth).
        long t0 = System.nanoTime();
        DatabaseManagementService offline = builder(home, pageCache, importDir)
            .setConfig(BoltConnector.enabled, false)
            .build();
        // flowdb neo4j stop may come in this phase too: close the DBMS cleanly then as well.
        Thread closeOffline = new Thread(offline::shutdown);
        Runtime.getRuntime().addShutdownHook(closeOffline);
        boolean changed = false;
        String failure = null;
        try {
            changed = setPassword(offline, password);
        } catch (Exception e) {
            failure = String.valueOf(e.getMessage()).strip().split("\n")[0];
        } finally {
            offline.shutdown();
        }
        Runtime.getRuntime().removeShutdownHook(closeOffline);
        if (failure != null) {  // one line, the last of the log: flowdb shows it to the user
            System.out.println("flowdb-neo4j could not give neo4j the password in " + args[3]
                               + ": " + failure);
            System.exit(1);
        }
        long t1 = System.nanoTime();
        System.out.printf("flowdb-neo4j password of neo4j %s with Bolt off in %.1f s%n",
                          changed ? "set" : "checked", (t1 - t0) / 1e9);

        // Phase 2: the same DBMS, now reachable on loopback with the password.
        DatabaseManagementService dbms = builder(home, pageCache, importDir)
            .setConfig(BoltConnector.enabled, true)
            .setConfig(BoltConnector.listen_address, new SocketAddress("127.0.0.1", port))
            // On stop the databases close first (transactions end or roll back), so Bolt's
            // own waits for idle threads and connections (5 s each) only delay the exit.
            .setConfig(BoltConnectorInternalSettings.thread_pool_shutdown_wait_time, Duration.ZERO)
            .setConfig(BoltConnectorInternalSettings.connection_shutdown_wait_time, Duration.ZERO)
            .build();
        Runtime.getRuntime().addShutdownHook(new Thread(dbms::shutdown));
        System.out.printf("flowdb-neo4j ready on bolt://127.0.0.1:%d in %.1f s%n",
                          port, (System.nanoTime() - t1) / 1e9);
        Thread.currentThread().join();
    }

    static DatabaseManagementServiceBuilder builder(Path home, long pageCache, Path importDir) {
        return new DatabaseManagementServiceBuilder(home)
            .setConfig(GraphDatabaseSettings.auth_enabled, true)
            // No lock-out after failed logins: the generated password cannot be
            // guessed, and a lock-out would let any local user shut flowdb out.
            .setConfig(GraphDatabaseSettings.auth_max_failed_attempts, 0)
            .setConfig(GraphDatabaseSettings.pagecache_memory, pageCache)
            // LOAD CSV reads no local files (and only an empty import directory)...
            .setConfig(GraphDatabaseSettings.allow_file_urls, false)
            .setConfig(GraphDatabaseSettings.load_csv_file_url_root, importDir)
            // ...and fetches no URL: every IPv4 and IPv6 address is blocked.
            .setConfig(GraphDatabaseInternalSettings.cypher_ip_blocklist,
                       List.of(new IPAddressString("0.0.0.0/0"), new IPAddressString("::/0")));
    }

    /** Give the user neo4j this password unless it has it already; true if it changed. */
    static boolean setPassword(DatabaseManagementService dbms, String password) throws Exception {
        var system = (GraphDatabaseAPI) dbms.database(GraphDatabaseSettings.SYSTEM_DATABASE_NAME);
        // Logging in as Bolt would is quick; the first Cypher statement of a JVM
        // costs seconds, so ALTER USER runs only when the password must change.
        var login = system.getDependencyResolver().resolveDependency(AuthManager.class)
            .login(AuthToken.newBasicAuthToken("neo4j", password), ClientConnectionInfo.EMBEDDED_CONNECTION);
        if (login.subject().getAuthenticationResult() == AuthenticationResult.SUCCESS) {
            return false;
        }
        try {
            system.executeTransactionally(
                "ALTER USER neo4j SET PASSWORD $pw CHANGE NOT REQUIRED", Map.of("pw", password));
        } catch (RuntimeException e) {
            // Neo4j refuses to "change" a password to the one already set.
            if (!String.valueOf(e.getMessage()).contains("cannot be the same")) {
                throw e;
            }
            system.executeTransactionally("ALTER USER neo4j SET PASSWORD CHANGE NOT REQUIRED");
        }
        return true;
    }
}
