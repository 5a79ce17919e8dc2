// Creates ACL bindings on an Apache Kafka cluster with the Admin client of the pinned release
// (Kafka 4 ships its kafka-acls tool in a jar the broker does not need). Run by acl.sh.
//
//   AclAdmin BOOTSTRAP 'PRINCIPAL|RESOURCE_TYPE|PATTERN_TYPE|NAME|OPERATION|PERMISSION' ...
//
// e.g. 'User:tierd|TOPIC|LITERAL|purchases|READ|ALLOW'. Every binding is created, then listed
// back; an error names the binding and ends the program with status 1.
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclBindingFilter;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourceType;

public class AclAdmin {
    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            System.err.println("usage: AclAdmin BOOTSTRAP 'PRINCIPAL|TYPE|PATTERN|NAME|OPERATION|PERMISSION'...");
            System.exit(2);
        }
        List<AclBinding> bindings = new ArrayList<>();
        for (int i = 1; i < args.length; i++) {
            String[] f = args[i].split("\\|", -1);
            if (f.length != 6) {
                System.err.println("not PRINCIPAL|TYPE|PATTERN|NAME|OPERATION|PERMISSION: " + args[i]);
                System.exit(2);
            }
            bindings.add(new AclBinding(
                new ResourcePattern(ResourceType.fromString(f[1]), f[3], PatternType.fromString(f[2])),
                new AccessControlEntry(f[0], "*", AclOperation.fromString(f[4]),
                    AclPermissionType.fromString(f[5]))));
        }
        Properties props = new Properties();
        props.put("bootstrap.servers", args[0]);
        try (Admin admin = Admin.create(props)) {
            var results = admin.createAcls(bindings).values();
            for (AclBinding b : bindings) {
                try {
                    results.get(b).get();
                } catch (Exception e) {
                    System.err.println("creating " + b + ": " + e.getMessage());
                    System.exit(1);
                }
            }
            for (AclBinding b : admin.describeAcls(AclBindingFilter.ANY).values().get()) {
                System.out.println(b);
            }
        }
    }
}
